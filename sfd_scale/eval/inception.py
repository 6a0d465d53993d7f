"""The Inception-v3 graph of TF-FID and ADM's evaluator, in PyTorch, with its three feature heads.

This is the 2015-12-05 TensorFlow Inception (`classify_image_graph_def.pb`) that ADM's
`evaluations/evaluator.py` runs, with the weights ported by pytorch-fid
(`pt_inception-2015-12-05-6726825d.pth`). It differs from torchvision's Inception-v3 in three
places, all reproduced here: the average pools inside the blocks ignore padding (TF's pools),
the last block pools with a max instead of an average, and the classifier has 1008 outputs.

Heads, as ADM reads them:
  * pool   `pool_3:0`       (N, 2048)  global average pool: FID, precision/recall
  * spatial `mixed_6/conv:0` (N, 2023) the first 7 channels of Mixed_6d's 1x1 branch (17 x 17),
                                        flattened in TF's (H, W, C) order: sFID
  * logits `softmax/logits` (N, 1008)  pool @ W without the bias (ADM's softmax input): IS

Input preprocessing follows the TF graph: images in [0, 255] are resized to 299 x 299 with TF1's
bilinear resize (no half-pixel centres), then mapped to [-1, 1) by (x - 128) / 128.
State-dict keys match torchvision's / pytorch-fid's layout, so the released file loads strictly.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sfd_scale.models.weights import load_strict, read_state_dict

log = logging.getLogger(__name__)

INCEPTION_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                         + INCEPTION_WEIGHTS_NAME)
INPUT_SIZE = 299
POOL_DIM = 2048
SPATIAL_CHANNELS = 7
SPATIAL_SIDE = 17
SPATIAL_DIM = SPATIAL_SIDE * SPATIAL_SIDE * SPATIAL_CHANNELS  # 2023
NUM_LOGITS = 1008
BN_EPS = 1e-3  # the TF graph's batch-norm epsilon


class FrozenBatchNorm2d(nn.Module):
    """Inference-only batch norm: the network is never trained here, so there is no train mode
    to forget to switch off. Keys match nn.BatchNorm2d (weight, bias, running_mean/var)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            training=False, eps=BN_EPS)


class ConvBN(nn.Module):
    """Convolution without bias, batch norm, ReLU (torchvision's BasicConv2d keys: conv, bn)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int],
                 stride: int = 1, padding: int | tuple[int, int] = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride,
                              padding=padding, bias=False)
        self.bn = FrozenBatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _tf_avg_pool(x: torch.Tensor) -> torch.Tensor:
    # TF's 3x3 SAME average pool divides by the number of real (unpadded) pixels.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class BlockA(nn.Module):
    """35 x 35 block (Mixed_5b/c/d): 1x1, 5x5, double 3x3 and pooled branches."""

    def __init__(self, in_channels: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = ConvBN(in_channels, 64, 1)
        self.branch5x5_1 = ConvBN(in_channels, 48, 1)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(in_channels, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(in_channels, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_tf_avg_pool(x))], 1)


class ReductionB(nn.Module):
    """35 -> 17 reduction (Mixed_6a)."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3 = ConvBN(in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(in_channels, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, 3, stride=2)], 1)


class BlockC(nn.Module):
    """17 x 17 block with factorised 7x7 convolutions (Mixed_6b..e)."""

    def __init__(self, in_channels: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = ConvBN(in_channels, 192, 1)
        self.branch7x7_1 = ConvBN(in_channels, c7, 1)
        self.branch7x7_2 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = ConvBN(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = ConvBN(in_channels, c7, 1)
        self.branch7x7dbl_2 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = ConvBN(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = ConvBN(in_channels, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(self.branches(x), 1)

    def branches(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The four branch outputs; the first (1x1) is the sFID feature map in Mixed_6d."""
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                      self.branch7x7dbl_4, self.branch7x7dbl_5):
            d = layer(d)
        return [self.branch1x1(x), b7, d, self.branch_pool(_tf_avg_pool(x))]


class ReductionD(nn.Module):
    """17 -> 8 reduction (Mixed_7a)."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3_1 = ConvBN(in_channels, 192, 1)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(in_channels, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)


class BlockE(nn.Module):
    """8 x 8 block with split 1x3 / 3x1 branches (Mixed_7b, Mixed_7c)."""

    def __init__(self, in_channels: int, max_pool: bool) -> None:
        super().__init__()
        # The TF graph's last block (Mixed_7c) pools with a max where the paper has an average.
        self.max_pool = max_pool
        self.branch1x1 = ConvBN(in_channels, 320, 1)
        self.branch3x3_1 = ConvBN(in_channels, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBN(in_channels, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvBN(in_channels, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(s), self.branch3x3_2b(s)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        b3dbl = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _tf_avg_pool(x)
        return torch.cat([self.branch1x1(x), b3, b3dbl, self.branch_pool(pooled)], 1)


@dataclass
class InceptionFeatures:
    """The three heads for one batch (or a whole image set), float32 NumPy arrays."""

    pool: np.ndarray
    """(N, 2048) pool_3 features."""
    spatial: np.ndarray
    """(N, 2023) mixed_6/conv[..., :7] features in (H, W, C) order."""
    logits: np.ndarray
    """(N, 1008) unbiased logits (pool @ W)."""

    def __len__(self) -> int:
        return len(self.pool)

    @classmethod
    def concat(cls, parts: list[InceptionFeatures]) -> InceptionFeatures:
        if not parts:
            return cls(np.zeros((0, POOL_DIM), np.float32), np.zeros((0, SPATIAL_DIM), np.float32),
                       np.zeros((0, NUM_LOGITS), np.float32))
        return cls(*(np.concatenate([getattr(p, k) for p in parts]) for k in ("pool", "spatial",
                                                                             "logits")))


def tf1_resize_bilinear(x: torch.Tensor, size: int) -> torch.Tensor:
    """TF1 `resize_bilinear(align_corners=False)` of (B, C, H, W): source = dest * in / out (no
    half-pixel centres), interpolating along x first, then y, as TF's kernel does."""

    def axis(n_in: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        src = torch.arange(size, dtype=torch.float32, device=x.device) * (n_in / size)
        lo = src.floor()
        hi = torch.clamp(src.ceil(), max=n_in - 1)
        return lo.long(), hi.long(), src - lo

    y0, y1, wy = axis(x.shape[2])
    x0, x1, wx = axis(x.shape[3])
    top, bottom = x[:, :, y0], x[:, :, y1]                        # (B, C, size, W)
    wx = wx.view(1, 1, 1, -1)
    top = top[..., x0] + (top[..., x1] - top[..., x0]) * wx       # (B, C, size, size)
    bottom = bottom[..., x0] + (bottom[..., x1] - bottom[..., x0]) * wx
    return top + (bottom - top) * wy.view(1, 1, -1, 1)


class FIDInceptionV3(nn.Module):
    """TF-FID Inception-v3 with pool, spatial and logit heads (module names as torchvision)."""

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b = BlockA(192, pool_features=32)
        self.Mixed_5c = BlockA(256, pool_features=64)
        self.Mixed_5d = BlockA(288, pool_features=64)
        self.Mixed_6a = ReductionB(288)
        self.Mixed_6b = BlockC(768, channels_7x7=128)
        self.Mixed_6c = BlockC(768, channels_7x7=160)
        self.Mixed_6d = BlockC(768, channels_7x7=160)
        self.Mixed_6e = BlockC(768, channels_7x7=192)
        self.Mixed_7a = ReductionD(768)
        self.Mixed_7b = BlockE(1280, max_pool=False)
        self.Mixed_7c = BlockE(2048, max_pool=True)
        self.fc = nn.Linear(POOL_DIM, NUM_LOGITS)

    @staticmethod
    def preprocess(images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) floats in [0, 255] -> (B, 3, 299, 299) in [-1, 1), as the TF graph."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"Inception expects images (B, 3, H, W), got {tuple(images.shape)}")
        x = tf1_resize_bilinear(images.float(), INPUT_SIZE)
        return (x - 128.0) / 128.0

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """images (B, 3, H, W) in [0, 255] -> pool (B, 2048), spatial (B, 2023), logits
        (B, 1008)."""
        x = self.preprocess(images)
        for layer in (self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3):
            x = layer(x)
        x = F.max_pool2d(x, 3, stride=2)                               # (B, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)                               # (B, 192, 35, 35)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
                      self.Mixed_6c):
            x = block(x)                                               # (B, 768, 17, 17)
        branches = self.Mixed_6d.branches(x)
        # mixed_6/conv is Mixed_6d's 1x1 branch; ADM keeps 7 channels and flattens NHWC.
        spatial = branches[0][:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1)  # (B, 2023)
        x = torch.cat(branches, 1)
        for block in (self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)                                               # (B, 2048, 8, 8)
        pool = x.mean(dim=(2, 3))                                      # (B, 2048)
        # ADM's IS reads softmax(pool @ W): the graph's bias is not part of that input.
        logits = pool @ self.fc.weight.t()                             # (B, 1008)
        return pool, spatial, logits


def load_inception(path: str | Path) -> FIDInceptionV3:
    """The FID Inception with pytorch-fid's ported weights from a local file, loaded strictly.

    `num_batches_tracked` entries (present in some saves of the file, meaningless at inference)
    are ignored.
    """
    state = read_state_dict(
        path, what=f"FID Inception-v3 ({INCEPTION_WEIGHTS_NAME})",
        where_to_get=f"the pytorch-fid releases on GitHub: {INCEPTION_WEIGHTS_URL}",
        prefer=("state_dict",))
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    model = FIDInceptionV3()
    load_strict(model, state, source=str(path))
    return model.eval().requires_grad_(False)


@torch.no_grad()
def extract_features(model: FIDInceptionV3, batches: Iterable[np.ndarray],
                     device: torch.device | str = "cpu", progress: bool = False,
                     total: int | None = None) -> InceptionFeatures:
    """Run uint8 (B, H, W, 3) image batches through the network; features in input order."""
    from tqdm import tqdm

    device = torch.device(device)
    model = model.to(device).eval()
    parts = []
    with tqdm(total=total, unit="img", desc="inception", disable=not progress,
              dynamic_ncols=True) as bar:
        for batch in batches:
            if batch.ndim != 4 or batch.shape[-1] != 3:
                raise ValueError(f"image batches must be (B, H, W, 3) uint8, got {batch.shape}")
            # np.array copies: batches streamed from files are read-only buffers.
            x = torch.from_numpy(np.array(batch)).to(device).permute(0, 3, 1, 2)
            pool, spatial, logits = model(x.float())
            parts.append(InceptionFeatures(pool.cpu().numpy(), spatial.cpu().numpy(),
                                           logits.cpu().numpy()))
            bar.update(len(batch))
    return InceptionFeatures.concat(parts)
