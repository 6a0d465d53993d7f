"""The thin entry points run end to end as a user types them (tiny sizes, CPU)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

from fixtures import tiny_sfd_config, write_latent_folder
from sfd_scale.config import to_dict
from sfd_scale.models.texture_vae import AutoencoderKL, TextureVAEConfig
from sfd_scale.models.weights import save_weights

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_train_then_sample(tmp_path):
    data = write_latent_folder(tmp_path / "latents")
    vae_cfg = TextureVAEConfig(ch=32, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[],
                               z_channels=4, embed_dim=4, resolution=8)
    save_weights(tmp_path / "vae.safetensors", AutoencoderKL(vae_cfg).state_dict())
    cfg = to_dict(tiny_sfd_config(data))
    cfg["train"].update(output_dir=str(tmp_path / "runs"), exp_name="tiny", sample_every=3)
    cfg["encoders"]["texture_vae_checkpoint"] = str(tmp_path / "vae.safetensors")
    cfg["encoders"]["texture_vae"] = {k: v for k, v in to_dict(vae_cfg).items()}
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(cfg))

    trained = run("launchers/train.py", "--config", str(config))
    assert trained.returncode == 0, trained.stderr[-2000:]
    run_dir = tmp_path / "runs" / "tiny"
    assert (run_dir / "checkpoints" / "step-00000006" / "manifest.json").is_file()
    assert (run_dir / "samples" / "step-00000006.png").is_file()   # periodic preview grid

    sampled = run("launchers/sample.py", "--config", str(config), "--checkpoint",
                  str(run_dir / "checkpoints" / "step-00000006"), "--num-images", "6",
                  "--out", str(tmp_path / "samples"), "--set", "sample.batch_size=4")
    assert sampled.returncode == 0, sampled.stderr[-2000:]
    npz = np.load(tmp_path / "samples" / "samples.npz")
    assert npz["arr_0"].shape == (6, 8, 8, 3) and npz["arr_0"].dtype == np.uint8
    assert npz["labels"].tolist() == [0, 1, 2, 3, 4, 0]      # balanced over 5 classes


def test_bad_override_names_the_key(tmp_path):
    out = run("launchers/train.py", "--config", "configs/sfd_xl.yaml", "--set", "optim.lrr=1")
    assert out.returncode != 0 and "unknown key optim.lrr" in out.stderr
