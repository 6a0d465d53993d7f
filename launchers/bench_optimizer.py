"""Time the optimizer part of a step: clip + torch fused AdamW + EMA lerp, against the fused
AdamW + clip + EMA kernel (kernels/adamw_ema.py), with fp32 weights and with bf16 compute copies of
the linear layers' weights (optim.bf16_weights), on tensors shaped like the model's parameters.

  python launchers/bench_optimizer.py --config configs/sfd_xxl.yaml          # GPU
  TRITON_INTERPRET=1 python launchers/bench_optimizer.py --set model.size=custom --set model.depth=2 \\
      --set model.hidden_size=32 --set model.num_heads=2 --steps 2            # CPU, tiny (tests)

Prints milliseconds per step and the effective bandwidth of each from the bytes each must move per
parameter besides the gradient norm's read: 48 for the three passes, 36 fused, 36 with bf16 copies
(a 2-byte gradient read, a 2-byte copy written).
"""
from __future__ import annotations

import argparse
import gc
import statistics
from typing import Callable

import torch
import torch.nn as nn

from sfd_scale.bench import _timed, bench_config, build_model_meta
from sfd_scale.logging import get_logger
from sfd_scale.models.fast_paths import fused_kernels_unavailable
from sfd_scale.parallel.distributed import clip_grads_and_check
from sfd_scale.parallel.engine import fused_step_on_device
from sfd_scale.train.trainer import resolve_device


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)
    get_logger()
    cfg = bench_config(args.config, args.overrides)
    device = resolve_device(cfg.train.device)
    reason = fused_kernels_unavailable(device)
    if reason is not None:
        parser.error(f"the fused kernel cannot run: {reason}")
    from sfd_scale.kernels.adamw_ema import AdamWEMA  # after TRITON_INTERPRET is known

    meta = build_model_meta(cfg.model)
    linear = {id(p) for m in meta.modules() if isinstance(m, nn.Linear) for p in m.parameters(recurse=False)}
    trainable = [(p.shape, id(p) in linear) for p in meta.parameters() if p.requires_grad]
    numel = sum(shape.numel() for shape, _ in trainable)
    hyper = dict(lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2), eps=1e-8,
                 weight_decay=cfg.optim.weight_decay)
    decay, max_norm = cfg.train.ema_decay, cfg.optim.max_grad_norm
    loss = torch.zeros((), device=device)

    def tensors() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        params = [torch.randn(shape, device=device).requires_grad_() for shape, _ in trainable]
        for p in params:
            p.grad = torch.randn_like(p)
        return params, [p.detach().clone() for p in params]

    def unfused() -> Callable[[], None]:
        params, ema = tensors()
        opt = torch.optim.AdamW(params, fused=device.type == "cuda", foreach=device.type != "cuda", **hyper)

        def run() -> None:
            clip_grads_and_check([p.grad for p in params], max_norm, loss, sharded=False)
            opt.step()
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1.0 - decay)
        return run

    def fused(bf16_copies: bool) -> Callable[[], None]:
        masters, ema = tensors()
        copies = None
        if bf16_copies:
            copies = [m.detach().bfloat16().requires_grad_() if is_linear else None
                      for m, (_, is_linear) in zip(masters, trainable)]
            for m, c in zip(masters, copies):
                if c is not None:
                    c.grad, m.grad = m.grad.bfloat16(), None
        opt = AdamWEMA(masters, ema, decay, **hyper, compute_copies=copies)
        return lambda: fused_step_on_device(opt, opt.gradients(), loss, cfg.optim.lr, max_norm, sharded=False)

    print(f"{device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
          f"{numel / 1e6:.1f} M parameters in {len(trainable)} tensors")
    print("| optimizer part | ms/step | GB/s (bytes it must move) |\n|---|---|---|")
    variants = (("clip + AdamW + EMA lerp", unfused, 48), ("fused kernel", lambda: fused(False), 36),
                ("fused kernel, bf16 weight copies", lambda: fused(True), 36))
    for name, build, per_param in variants:
        run = build()
        run()
        times = [_timed(run, device) for _ in range(args.steps)]
        median = statistics.median(times)
        print(f"| {name} | {median * 1e3:.2f} | {per_param * numel / median / 1e9:.0f} |")
        del run
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
