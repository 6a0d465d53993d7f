"""Train SFD: `python launchers/train.py --config configs/sfd_xl.yaml --set data.data_dir=...`.

The same command runs on many processes under any of the three launchers (choose the engine
with --set parallel.engine=ddp|fsdp2|deepspeed):
  torchrun --nproc_per_node 8 launchers/train.py --config ...
  deepspeed --num_gpus 8 launchers/train.py --config ...
  srun --ntasks-per-node 8 python launchers/train.py --config ...
The run folder is <train.output_dir>/<train.exp_name>,
and a run resumes from its latest complete checkpoint automatically (train.resume=auto). With
encoders.texture_vae_checkpoint and train.sample_every set, a sample grid of the EMA model is
written to <run>/samples/ every sample_every steps.

SIGUSR1 or SIGTERM, or a file <run>/preempt.request, makes every rank stop at the next step
boundary after checkpointing it (sfd_scale/train/preemption.py; launchers/*.slurm requeue the
job then). --preflight-world-size N only checks the configuration for N processes and exits.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from sfd_scale.config import SFDConfig, load_config
from sfd_scale.eval.generate import make_preview
from sfd_scale.logging import get_logger
from sfd_scale.models.texture_vae import load_texture_vae
from sfd_scale.parallel.dims import ParallelDims, check_config_fits
from sfd_scale.parallel.distributed import destroy_process_group, exit_after_distributed_run
from sfd_scale.train.preemption import PreemptionWatcher
from sfd_scale.train.trainer import Trainer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML run configuration")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set optim.lr=2e-4 (repeatable)")
    # The deepspeed launcher passes --local_rank=N; it must agree with LOCAL_RANK when both exist.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--preempt-check-every", type=int, default=1, metavar="N",
                        help="agree on stop requests every N steps (one scalar all-reduce each time)")
    parser.add_argument("--preflight-world-size", type=int, default=None, metavar="N",
                        help="check the configuration for a launch of N processes, then exit")
    return parser.parse_args(argv)


def preflight(cfg: SFDConfig, world_size: int) -> None:
    """Fail before any rank starts when the configuration cannot run on `world_size` processes."""
    dims = ParallelDims(world_size=world_size, tp=cfg.parallel.tensor_parallel, launcher="preflight")
    check_config_fits(cfg, dims)
    if not Path(cfg.data.data_dir).is_dir():
        raise FileNotFoundError(f"data.data_dir={cfg.data.data_dir!r} is not a folder (latent shards "
                                "written by launchers/extract.py, or the published ImageNet latents)")


def main() -> None:
    args = parse_args()
    log = get_logger()
    cfg: SFDConfig = load_config(args.config, args.overrides)
    if args.preflight_world_size is not None:
        preflight(cfg, args.preflight_world_size)
        log.info("preflight: the configuration fits %d process(es)", args.preflight_world_size)
        return
    dims = ParallelDims.from_env(tp=cfg.parallel.tensor_parallel, local_rank_arg=args.local_rank)
    if not dims.is_main:  # srun sets no RANK, which get_logger reads: quiet the other ranks here
        log.setLevel(logging.WARNING)
    run_dir = Path(cfg.train.output_dir) / cfg.train.exp_name
    log.info("run folder %s", run_dir)
    preview = None
    if cfg.encoders.texture_vae_checkpoint and cfg.train.sample_every > 0:
        vae = load_texture_vae(cfg.encoders.texture_vae_checkpoint, cfg.encoders.texture_vae)
        preview = make_preview(cfg.sample, cfg.diffusion, cfg.data, vae, run_dir / "samples",
                               cfg.model.num_classes)
    # Handlers first: a stop signal during start-up stops the run after its first step.
    with PreemptionWatcher(run_dir, dims.is_main, check_every=args.preempt_check_every) as watcher:
        # Every rank gets the preview (it decides whether the EMA is gathered); rank 0 draws it.
        trainer = Trainer(cfg, run_dir, preview=preview, dims=dims)
        trainer.maybe_resume()
        trainer.fit(should_stop=watcher.should_stop)
        watcher.mark_stopped(trainer.step)
    destroy_process_group()


if __name__ == "__main__":
    main()
    exit_after_distributed_run()
