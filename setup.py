"""sfd-scale: Semantic-First Diffusion training at scale."""
from setuptools import setup

PACKAGES = ["sfd_scale", "sfd_scale.models", "sfd_scale.diffusion", "sfd_scale.data",
            "sfd_scale.train", "sfd_scale.eval", "sfd_scale.parallel", "sfd_scale.kernels"]

setup(
    name="sfd-scale",
    version="0.1.0",
    description="Semantic-First Diffusion (SFD) training at scale",
    python_requires=">=3.10",
    # kernels/ lives at the top of the repo but installs as sfd_scale.kernels, so it can never
    # shadow another package named `kernels`.
    packages=PACKAGES,
    package_dir={"sfd_scale.kernels": "kernels"},
    install_requires=[
        "torch==2.13.0",
        "numpy>=1.26,<3",
        "safetensors>=0.4",
        "pyyaml>=6.0",
        "torchdiffeq==0.2.5",
        "scipy>=1.11",
        "scikit-learn>=1.4",
        "pillow>=10",
        "tqdm>=4.66",
        "wandb==0.31.0",
        # Reference checkpoints pickle their config as an OmegaConf object; we allow-list it.
        "omegaconf>=2.3,<3",
    ],
    extras_require={
        # Triton runs the kernel tests on CPU in its interpreter (TRITON_INTERPRET=1).
        "test": ["pytest>=8", "pytest-timeout>=2.3", "triton==3.9.0; platform_system == 'Linux'"],
        # Distributed engines (tested on CPU with gloo): DeepSpeed ZeRO and megatron-core TP.
        "engines": ["deepspeed==0.19.8", "megatron-core==0.16.1"],
        # NVIDIA DALI image decoding (GPU `mixed`; CPU-only mode for tests). It pins packaging<=26.3.
        "dali": ["nvidia-dali-cuda130==2.4.0"],
        # FP8 training linears (model.fp8; Ada/Hopper GPUs, emulated on the CPU for tests).
        "fp8": ["torchao==0.18.0"],
        # GPU-only fast paths; each is optional and has a plain-PyTorch twin.
        "gpu": ["flash-attn", "xformers"],
    },
)
