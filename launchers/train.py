"""Train SFD: `python launchers/train.py --config configs/sfd_xl.yaml --set data.data_dir=...`.

Single process (CPU or one GPU) for now; the run folder is <train.output_dir>/<train.exp_name>,
and a run resumes from its latest complete checkpoint automatically (train.resume=auto). With
encoders.texture_vae_checkpoint and train.sample_every set, a sample grid of the EMA model is
written to <run>/samples/ every sample_every steps.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from sfd_scale.config import SFDConfig, load_config
from sfd_scale.eval.generate import make_preview
from sfd_scale.logging import get_logger
from sfd_scale.models.texture_vae import load_texture_vae
from sfd_scale.train.trainer import Trainer


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True, help="YAML run configuration")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set optim.lr=2e-4 (repeatable)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    log = get_logger()
    cfg: SFDConfig = load_config(args.config, args.overrides)
    run_dir = Path(cfg.train.output_dir) / cfg.train.exp_name
    log.info("run folder %s", run_dir)
    preview = None
    if cfg.encoders.texture_vae_checkpoint and cfg.train.sample_every > 0:
        vae = load_texture_vae(cfg.encoders.texture_vae_checkpoint, cfg.encoders.texture_vae)
        preview = make_preview(cfg.sample, cfg.diffusion, cfg.data, vae, run_dir / "samples",
                               cfg.model.num_classes)
    trainer = Trainer(cfg, run_dir, preview=preview)
    trainer.maybe_resume()
    trainer.fit()


if __name__ == "__main__":
    main()
