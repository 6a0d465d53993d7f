"""Loss curves of the same training run in different precisions (bf16 against FP8 recipes and a bf16
residual stream).

FP8 is trusted only after its loss curve follows bf16's from the same seed, on the same batches,
through the same noise and time draws. `loss_curves` trains one fresh model per recipe for
`steps` steps (the benchmark's single-device step: loss, backward, clipping, AdamW, EMA) and
compares each curve with the first: the mean and largest relative gap of the smoothed curves, and
the ratio of their final losses. Batches come from the run's latent shards when `data.data_dir`
is a folder (the first `pool` batches of the seeded loader, cycled), else they are synthetic.
"""
from __future__ import annotations

import dataclasses
import datetime
import itertools
import logging
from typing import Callable

import torch

from sfd_scale.bench import SYNTHETIC_DATA, Variant, build_training_step, synthetic_batch
from sfd_scale.config import SFDConfig
from sfd_scale.data.loader import LatentShardDataset, ShardLoader
from sfd_scale.models.fast_paths import FP8_CASTS_ATTR, FP8_RECIPES

log = logging.getLogger(__name__)


def training_batches(cfg: SFDConfig, batch_size: int, pool: int, device: torch.device
                     ) -> tuple[list[tuple[torch.Tensor, ...]], str]:
    """`pool` batches on `device` and where they came from."""
    if cfg.data.data_dir == SYNTHETIC_DATA:
        return [synthetic_batch(cfg.model, batch_size, device, cfg.train.seed + i) for i in range(pool)], "synthetic"
    dataset = LatentShardDataset.from_config(cfg.data)
    loader = ShardLoader(dataset, batch_size=batch_size, seed=cfg.train.seed, random_flip=cfg.data.random_flip,
                         device=device)
    return [tuple(batch) for batch in itertools.islice(iter(loader), pool)], str(cfg.data.data_dir)


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average (the first points average what exists so far)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def compare(reference: list[float], other: list[float], window: int) -> dict:
    """Relative gaps of `other`'s smoothed curve from `reference`'s."""
    ref, oth = smooth(reference, window), smooth(other, window)
    gaps = [abs(o - r) / abs(r) for r, o in zip(ref, oth)]
    tail = max(1, len(reference) // 10)
    return {"mean_relative_gap": sum(gaps) / len(gaps), "max_relative_gap": max(gaps),
            "final_loss_ratio": (sum(other[-tail:]) / tail) / (sum(reference[-tail:]) / tail)}


BF16_RESIDUAL = "bf16_residual"
"""The recipe part that carries the residual stream in bf16 (`model.residual_precision: bf16`)."""


def recipe_variant(base: Variant, recipe: str) -> Variant:
    """`base` with `recipe`'s precision: an FP8 recipe ('none' = bf16 matmuls), 'bf16_residual', or
    an FP8 recipe and 'bf16_residual' joined by '+' (e.g. 'rowwise+bf16_residual')."""
    parts = recipe.split("+")
    fp8 = [p for p in parts if p in FP8_RECIPES]
    unknown = [p for p in parts if p not in FP8_RECIPES and p != BF16_RESIDUAL]
    if unknown or len(fp8) > 1 or len(set(parts)) != len(parts):
        raise ValueError(f"precision recipe {recipe!r}: expected an FP8 recipe ({', '.join(FP8_RECIPES)}), "
                         f"{BF16_RESIDUAL!r}, or one of each joined by '+'")
    return dataclasses.replace(base, label=recipe, fp8=fp8[0] if fp8 else "none",
                               residual="bf16" if BF16_RESIDUAL in parts else "fp32")


def loss_curves(cfg: SFDConfig, base: Variant, recipes: list[str], steps: int, batch_size: int, pool: int,
                device: torch.device, window: int = 10, on_curve: Callable[[dict], None] | None = None) -> dict:
    """Train one fresh model per precision recipe (`recipe_variant`) from the same seed; curves and gaps.

    `on_curve` gets the report so far after each recipe, so a run cut short (a GPU lease's time limit)
    keeps the curves it finished."""
    if not recipes or steps < 1 or pool < 1 or window < 1:
        raise ValueError(f"need recipes, steps >= 1, pool >= 1 and window >= 1; got {recipes}, {steps}, {pool}, {window}")
    variants = [recipe_variant(base, recipe) for recipe in recipes]
    batches, source = training_batches(cfg, batch_size, pool, device)
    curves: dict[str, list[float]] = {}
    casts: dict[str, str] = {}  # which casts an FP8 recipe ran with: a curve is only as good as its kernels
    for recipe, variant in zip(recipes, variants):
        engine, step = build_training_step(cfg, variant, batches, device)
        if (cast_by := getattr(engine.module, FP8_CASTS_ATTR, None)) is not None:
            casts[recipe] = cast_by
        losses = [step()[0]["loss"] for _ in range(steps)]
        curves[recipe] = torch.stack(losses).float().tolist()  # one sync per curve
        log.info("%s: loss %.4f -> %.4f over %d steps", recipe, curves[recipe][0], curves[recipe][-1], steps)
        del engine, step
        report = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "data": source, "batch_size": batch_size, "pool": pool, "steps": steps, "window": window,
            "model": {"size": cfg.model.size, "depth": cfg.model.depth, "hidden_size": cfg.model.hidden_size},
            "compile": base.compile, "reference": recipes[0], "curves": dict(curves), "fp8_casts": dict(casts),
            "against_reference": {r: compare(curves[recipes[0]], curves[r], window) for r in curves if r != recipes[0]},
        }
        if on_curve is not None:
            on_curve(report)
    return report


def format_comparison(report: dict) -> str:
    lines = [f"{report['device']}, {report['steps']} steps, batch {report['batch_size']}, data {report['data']}; "
             f"reference {report['reference']}",
             "| recipe | first loss | last loss | mean gap | max gap | final ratio |", "|---|---|---|---|---|---|"]
    for recipe, curve in report["curves"].items():
        gap = report["against_reference"].get(recipe)
        cells = ["-", "-", "-"] if gap is None else [f"{gap['mean_relative_gap']:.2%}", f"{gap['max_relative_gap']:.2%}",
                                                     f"{gap['final_loss_ratio']:.4f}"]
        lines.append(f"| {recipe} | {curve[0]:.4f} | {curve[-1]:.4f} | " + " | ".join(cells) + " |")
    lines += [f"{recipe}: FP8 casts by {cast_by}" for recipe, cast_by in report.get("fp8_casts", {}).items()]
    return "\n".join(lines)
