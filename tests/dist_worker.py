"""Multi-process test worker: train with the real Trainer on any engine, then dump the results.

Each rank runs
    python tests/dist_worker.py --config CFG.yaml --run-dir DIR --max-steps N [--set k=v ...] --dump OUT.pt
under `launch()` below (torchrun's environment contract), or under torchrun / deepspeed / srun
themselves. The worker resumes from DIR's latest checkpoint when there is one (train.resume),
trains to step N, gathers the whole model and EMA through `engine.consolidated_state()`, and
rank 0 writes OUT.pt = {"losses": {step: loss averaged over ranks}, "model", "ema", "step",
"world_size"} (torch.save of tensors and plain values; read it with weights_only=True).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]


def read_losses(run_dir: Path) -> dict[int, float]:
    """Per-step loss from a run's metrics.jsonl (the latest line wins for a step logged twice)."""
    path = Path(run_dir) / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    return {int(r["step"]): float(r["loss"]) for r in rows}


def _main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--run-dir", required=True, type=Path)
    parser.add_argument("--max-steps", required=True, type=int)
    parser.add_argument("--dump", type=Path, default=None)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None)
    args = parser.parse_args(argv)

    import torch

    from sfd_scale.config import load_config
    from sfd_scale.logging import get_logger
    from sfd_scale.parallel.dims import ParallelDims
    from sfd_scale.train.trainer import Trainer

    torch.set_num_threads(1)
    get_logger()
    cfg = load_config(args.config, args.overrides)
    dims = ParallelDims.from_env(tp=cfg.parallel.tensor_parallel, local_rank_arg=args.local_rank)
    trainer = Trainer(cfg, args.run_dir, dims=dims)
    trainer.maybe_resume()
    trainer.fit(args.max_steps)
    model, ema = trainer.engine.consolidated_state()
    if dims.is_main and args.dump is not None:
        torch.save({"losses": read_losses(args.run_dir), "model": model, "ema": ema,
                    "step": trainer.step, "world_size": dims.world_size,
                    "graph_warmup_steps": None if trainer.graphed_step is None else trainer.graphed_step.warmup_steps},
                   args.dump)


def main() -> None:
    run_and_exit(_main)


def run_and_exit(worker: Callable[[], None]) -> None:
    """Run a worker; end the process without interpreter teardown (DCP's, DeepSpeed's and gloo's
    threads can abort a normal exit), after a barrier and destroy_process_group."""
    code = 0
    try:
        worker()
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# ----------------------------------------------------------------------------------------------
# Launching from tests
# ----------------------------------------------------------------------------------------------
def train_on_two_ranks(tmp_path: Path, cfg, engine: str, run: str, max_steps: int) -> dict:
    """Train `cfg` (an SFDConfig) on 2 ranks of `engine` (resuming `run` if it has a checkpoint),
    with the fused kernels in Triton's interpreter; the worker's dump."""
    import torch
    import yaml

    from sfd_scale.config import to_dict

    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    dump = tmp_path / f"{run}-{max_steps}.pt"
    launch(2, ["--config", str(tmp_path / "cfg.yaml"), "--run-dir", str(tmp_path / run), "--max-steps",
               str(max_steps), "--set", f"parallel.engine={engine}", "--dump", str(dump)], tmp_path / f"{run}-logs",
           env={"TRITON_INTERPRET": "1"}, timeout=300)
    return torch.load(dump, weights_only=True)


def assert_ranks_match_one_process(dump: dict, single, steps: tuple[int, ...]) -> None:
    """The logged losses at `steps` and the consolidated model and EMA of a multi-rank run's `dump`
    equal (to float noise) those of `single`, a Trainer that ran the same steps in one process."""
    import pytest
    import torch

    want, got = read_losses(single.run_dir), dump["losses"]
    assert sorted(got) == sorted(want) == list(steps)
    assert [got[s] for s in steps] == pytest.approx([want[s] for s in steps], rel=1e-5)
    model, ema = single.engine.consolidated_state()
    for name, expected in (("model", model), ("ema", ema)):
        for key, value in expected.items():
            torch.testing.assert_close(dump[name][key], value, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}.{key}: {m}")


class WorkerError(RuntimeError):
    """A worker failed or timed out; the message holds the end of every rank's output."""


def launch(nproc: int, args: list[str], log_dir: Path, timeout: float = 120.0,
           script: Path | None = None, env: dict[str, str] | None = None) -> list[str]:
    """Start `nproc` ranks of `script` (default this worker) with torchrun's environment variables
    (none for nproc=1: a plain single process) and wait; returns each rank's output.

    If one rank fails, the others are given a few seconds and then killed, so a rank stuck in a
    collective never hangs the test.
    """
    from sfd_scale.parallel.distributed import free_port

    script = Path(__file__) if script is None else script
    log_dir.mkdir(parents=True, exist_ok=True)
    # Only our variables place the ranks, even when the tests themselves run under a launcher.
    base = {k: v for k, v in os.environ.items()
            if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
            and not k.startswith("SLURM_")}
    base.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **(env or {}))
    port = str(free_port())
    procs, logs = [], []
    for rank in range(nproc):
        rank_env = dict(base)
        if nproc > 1:
            rank_env.update(RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_RANK=str(rank),
                            LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        log = open(log_dir / f"rank{rank}.log", "w")
        logs.append(log)
        procs.append(subprocess.Popen([sys.executable, str(script), *args], cwd=REPO, env=rank_env,
                                      stdout=log, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + timeout
    failed_at = None
    while any(p.poll() is None for p in procs):
        now = time.monotonic()
        if failed_at is None and any(p.returncode not in (None, 0) for p in procs):
            failed_at = now
        if now > deadline or (failed_at is not None and now > failed_at + 5):
            for p in procs:
                if p.poll() is None:
                    p.kill()
            break
        time.sleep(0.05)
    for p in procs:
        p.wait()
    for log in logs:
        log.close()
    outputs = [(log_dir / f"rank{r}.log").read_text() for r in range(nproc)]
    if any(p.returncode != 0 for p in procs):
        detail = "\n".join(f"--- rank {r} (exit {p.returncode}) ---\n{out[-3000:]}"
                           for r, (p, out) in enumerate(zip(procs, outputs)))
        raise WorkerError(f"{nproc}-process run of {script.name} {' '.join(args)} failed:\n{detail}")
    return outputs


if __name__ == "__main__":
    main()
