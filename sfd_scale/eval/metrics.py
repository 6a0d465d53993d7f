"""ADM-compatible image-set metrics: FID, sFID, Inception Score, precision and recall.

Definitions follow guided-diffusion's `evaluations/evaluator.py`, which produced the FIDs that
SFD and its baselines report:
  * FID / sFID: Frechet distance between Gaussians fitted to pool / spatial Inception features
    (mean, `np.cov(rowvar=False)`); if the matrix square root is not finite, eps = 1e-6 is added
    to both diagonals; an imaginary part above 1e-3 on the diagonal is an error.
  * IS: exp(E[KL(p(y|x) || p(y))]) from softmax(unbiased logits) in splits of 5000, averaged.
  * precision / recall: k-NN manifolds (k = 3, the k-th neighbour counting the point itself at
    distance 0) on pool features with squared Euclidean distances, computed in float16 with a
    float32 fallback when a block overflows, in blocks of 10000 x 10000.
The reference batch (`VIRTUAL_imagenet256_labeled.npz`) brings `mu`, `sigma`, `mu_s`, `sigma_s`
and its images (`arr_0`), from which the pool features for precision/recall are computed.
"""
from __future__ import annotations

import io
import json
import logging
import math
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import linalg
from scipy.special import logsumexp

from sfd_scale.atomic import atomic_write_bytes
from sfd_scale.eval.inception import FIDInceptionV3, InceptionFeatures, extract_features

log = logging.getLogger(__name__)

FID_EPS = 1e-6
IMAG_TOLERANCE = 1e-3
IS_SPLIT_SIZE = 5000
PR_NEIGHBOURS = 3
PR_BATCH_SIZE = 10000
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
FEATURE_KEYS = ("pool", "spatial", "logits")


# ----------------------------------------------------------------------------------------------
# Frechet distance
# ----------------------------------------------------------------------------------------------
@dataclass
class GaussianStats:
    """Mean (D,) and covariance (D, D) of a feature set, float64."""

    mu: np.ndarray
    sigma: np.ndarray

    @classmethod
    def of(cls, features: np.ndarray) -> GaussianStats:
        if features.ndim != 2 or len(features) < 2:
            raise ValueError(f"need at least 2 feature rows (N, D) for a covariance, got "
                             f"shape {features.shape}")
        features = features.astype(np.float64)
        return cls(features.mean(axis=0), np.cov(features, rowvar=False))


def frechet_distance(a: GaussianStats, b: GaussianStats, eps: float = FID_EPS) -> float:
    """||mu_a - mu_b||^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^(1/2)), ADM / TTUR style."""
    mu1, mu2 = np.atleast_1d(a.mu).astype(np.float64), np.atleast_1d(b.mu).astype(np.float64)
    s1, s2 = np.atleast_2d(a.sigma).astype(np.float64), np.atleast_2d(b.sigma).astype(np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"feature statistics do not match: means {mu1.shape} and {mu2.shape}, "
                         f"covariances {s1.shape} and {s2.shape}")
    with warnings.catch_warnings():
        # scipy warns on singular products; the finiteness check below is what decides.
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(s1 @ s2)
        if not np.isfinite(covmean).all():
            log.warning("Frechet distance: singular covariance product; adding %g to the "
                        "diagonals", eps)
            offset = np.eye(len(s1)) * eps
            covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=IMAG_TOLERANCE):
            raise ValueError(f"Frechet distance: the matrix square root has an imaginary "
                             f"component of {np.abs(covmean.imag).max():.3g}")
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


# ----------------------------------------------------------------------------------------------
# Inception Score
# ----------------------------------------------------------------------------------------------
def inception_score(logits: np.ndarray, split_size: int = IS_SPLIT_SIZE) -> float:
    """Mean over splits of exp(mean_x KL(softmax(logits_x) || mean softmax)), as ADM."""
    if logits.ndim != 2 or len(logits) == 0:
        raise ValueError(f"inception_score needs logits (N, classes), got shape {logits.shape}")
    # Log space throughout, so probabilities that underflow to 0 add 0, not 0 * inf.
    log_p = logits.astype(np.float64)
    log_p = log_p - logsumexp(log_p, axis=1, keepdims=True)
    scores = []
    for start in range(0, len(log_p), split_size):
        part = log_p[start:start + split_size]
        log_marginal = logsumexp(part, axis=0, keepdims=True) - math.log(len(part))
        kl = (np.exp(part) * (part - log_marginal)).sum(axis=1).mean()
        scores.append(math.exp(kl))
    return float(np.mean(scores))


# ----------------------------------------------------------------------------------------------
# Precision and recall (improved k-NN manifolds, Kynkaanniemi et al., with ADM's settings)
# ----------------------------------------------------------------------------------------------
def pairwise_sq_distances(u: torch.Tensor, v: torch.Tensor, half: bool = True) -> torch.Tensor:
    """Squared Euclidean distances (len(u), len(v)) as float32, clamped at 0.

    half: compute in float16 like ADM's evaluator and redo the block in float32 when float16
    overflows (far-apart points); the float16 rounding is part of ADM's published numbers.
    """
    if half:
        d = _sq_distances(u.half(), v.half())
        if torch.isfinite(d).all():
            return d.float()
    return _sq_distances(u.float(), v.float())


def _sq_distances(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    norm_u = (u * u).sum(1, keepdim=True)                   # (U, 1)
    norm_v = (v * v).sum(1, keepdim=True).t()               # (1, V)
    return torch.clamp(norm_u - 2 * (u @ v.t()) + norm_v, min=0)


def manifold_radii(features: torch.Tensor, k: int = PR_NEIGHBOURS,
                   batch_size: int = PR_BATCH_SIZE, half: bool = True) -> torch.Tensor:
    """Per point, the squared distance to its k-th nearest neighbour (the point itself is the
    0-th, so k = 3 is the third other point). Returns (N,) float32."""
    n = len(features)
    if n <= k:
        raise ValueError(f"precision/recall with k = {k} needs more than {k} points, got {n}")
    radii = torch.empty(n, dtype=torch.float32, device=features.device)
    for r0 in range(0, n, batch_size):
        rows = features[r0:r0 + batch_size]
        dist = torch.cat([pairwise_sq_distances(rows, features[c0:c0 + batch_size], half)
                          for c0 in range(0, n, batch_size)], dim=1)   # (rows, N)
        radii[r0:r0 + len(rows)] = dist.kthvalue(k + 1, dim=1).values
    return radii


def precision_recall(reference: np.ndarray, samples: np.ndarray, k: int = PR_NEIGHBOURS,
                     batch_size: int = PR_BATCH_SIZE, half: bool = True,
                     device: torch.device | str = "cpu") -> tuple[float, float]:
    """(precision, recall) of sample features against reference features (both (N, D)).

    precision: fraction of samples inside some reference point's k-NN ball;
    recall: fraction of reference points inside some sample's k-NN ball.
    """
    ref = torch.as_tensor(reference, dtype=torch.float32, device=device)
    fake = torch.as_tensor(samples, dtype=torch.float32, device=device)
    if ref.dim() != 2 or fake.dim() != 2 or ref.shape[1] != fake.shape[1]:
        raise ValueError(f"precision/recall need feature matrices of equal width, got "
                         f"{tuple(ref.shape)} and {tuple(fake.shape)}")
    radii_ref = manifold_radii(ref, k, batch_size, half)
    radii_fake = manifold_radii(fake, k, batch_size, half)
    ref_covered = torch.zeros(len(ref), dtype=torch.bool, device=device)
    fake_covered = torch.zeros(len(fake), dtype=torch.bool, device=device)
    for r0 in range(0, len(ref), batch_size):
        rows = slice(r0, r0 + batch_size)
        for c0 in range(0, len(fake), batch_size):
            cols = slice(c0, c0 + batch_size)
            dist = pairwise_sq_distances(ref[rows], fake[cols], half)          # (R, F)
            ref_covered[rows] |= (dist <= radii_fake[cols].unsqueeze(0)).any(dim=1)
            fake_covered[cols] |= (dist <= radii_ref[rows].unsqueeze(1)).any(dim=0)
    return float(fake_covered.double().mean()), float(ref_covered.double().mean())


# ----------------------------------------------------------------------------------------------
# Reading image sets and feature files
# ----------------------------------------------------------------------------------------------
def _read_exact(f, size: int, path: Path) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = f.read(size - len(data))
        if not chunk:
            raise ValueError(f"'{path}': the image array ends early (file truncated?)")
        data += chunk
    return bytes(data)


def _npz_members(path: Path) -> list[str]:
    try:
        with zipfile.ZipFile(path) as zf:
            return [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
    except (zipfile.BadZipFile, OSError) as err:
        raise ValueError(f"'{path}' is not a readable .npz file: {err}") from err


def npz_image_count(path: str | Path, key: str = "arr_0") -> int:
    """Number of images in an npz's `key` array, read from its header only."""
    path = Path(path)
    with zipfile.ZipFile(path) as zf, zf.open(key + ".npy") as f:
        shape, _, _ = read_npy_header(f)
    return shape[0]


def read_npy_header(f) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(f)
    raise ValueError(f"unsupported .npy format version {version}")


def iter_npz_images(path: str | Path, batch_size: int, key: str = "arr_0"
                    ) -> Iterator[np.ndarray]:
    """Stream uint8 (B, H, W, 3) batches from an npz without loading the whole array (a 50k x
    256 x 256 sample file is 9.8 GB)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: '{path}'")
    if key not in _npz_members(path):
        raise ValueError(f"'{path}' has no array '{key}' (arrays: {', '.join(_npz_members(path))})")
    with zipfile.ZipFile(path) as zf, zf.open(key + ".npy") as f:
        shape, fortran, dtype = read_npy_header(f)
        if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3 or fortran:
            raise ValueError(f"'{path}': '{key}' must be a C-ordered uint8 array (N, H, W, 3), "
                             f"got {dtype} {shape}")
        per_image = int(np.prod(shape[1:]))
        for start in range(0, shape[0], batch_size):
            count = min(batch_size, shape[0] - start)
            raw = _read_exact(f, count * per_image, path)
            yield np.frombuffer(raw, dtype=np.uint8).reshape(count, *shape[1:])


def image_files(folder: str | Path) -> list[Path]:
    """Image files of a folder (not recursive), sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: '{folder}'")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"'{folder}' holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def iter_folder_images(folder: str | Path, batch_size: int) -> Iterator[np.ndarray]:
    """uint8 (B, H, W, 3) batches of a folder's images (RGB), in file-name order."""
    from PIL import Image

    files = image_files(folder)
    for start in range(0, len(files), batch_size):
        batch = []
        for path in files[start:start + batch_size]:
            with Image.open(path) as img:
                batch.append(np.asarray(img.convert("RGB"), dtype=np.uint8))
        if len({b.shape for b in batch}) > 1:
            raise ValueError(f"'{folder}': images of different sizes in one batch near "
                             f"'{files[start].name}'; resize them to one size first")
        yield np.stack(batch)


def is_feature_file(path: str | Path) -> bool:
    """True for an npz written by `save_features` (Inception features instead of images)."""
    path = Path(path)
    return path.is_file() and set(FEATURE_KEYS) <= set(_npz_members(path))


def save_features(path: str | Path, features: InceptionFeatures) -> Path:
    """Features plus their ADM statistics, so the file also serves as a reference batch."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pool, spatial = GaussianStats.of(features.pool), GaussianStats.of(features.spatial)
    buffer = io.BytesIO()
    np.savez(buffer, pool=features.pool, spatial=features.spatial, logits=features.logits,
             mu=pool.mu, sigma=pool.sigma, mu_s=spatial.mu, sigma_s=spatial.sigma)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def load_features(path: str | Path) -> InceptionFeatures:
    with np.load(Path(path)) as data:
        return InceptionFeatures(*(data[k].astype(np.float32) for k in FEATURE_KEYS))


def compute_features(source: str | Path, inception: FIDInceptionV3 | None,
                     device: torch.device | str = "cpu", batch_size: int = 100,
                     progress: bool = False) -> InceptionFeatures:
    """Features of an image set: an npz (`arr_0`), a folder of images, or a feature file."""
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"image set not found: '{source}'")
    if is_feature_file(source):
        return load_features(source)
    if inception is None:
        raise ValueError(f"'{source}' holds images: Inception weights are needed "
                         "(--inception-weights)")
    if source.is_dir():
        total = len(image_files(source))
        batches = iter_folder_images(source, batch_size)
    else:
        total = npz_image_count(source) if source.is_file() else None
        batches = iter_npz_images(source, batch_size)
    log.info("computing Inception features of %s (%s images)", source, total)
    return extract_features(inception, batches, device, progress=progress, total=total)


# ----------------------------------------------------------------------------------------------
# Reference batches and the report
# ----------------------------------------------------------------------------------------------
@dataclass
class ReferenceBatch:
    """What the metrics need from the reference side."""

    pool: GaussianStats
    spatial: GaussianStats
    pool_features: np.ndarray
    """(N, 2048) reference pool features, for precision/recall."""


def load_reference(path: str | Path, inception: FIDInceptionV3 | None,
                   device: torch.device | str = "cpu", batch_size: int = 100,
                   progress: bool = False) -> ReferenceBatch:
    """An ADM reference batch (`mu`, `sigma`, `mu_s`, `sigma_s`, images `arr_0`) or a feature
    file. Stored statistics are used as they are (as ADM does); features come from the images."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"reference batch not found: '{path}'. For ImageNet 256 get "
            "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/"
            "256/VIRTUAL_imagenet256_labeled.npz")
    members = set(_npz_members(path))
    features = compute_features(path, inception, device, batch_size, progress)
    if {"mu", "sigma", "mu_s", "sigma_s"} <= members:
        with np.load(path) as data:
            pool = GaussianStats(data["mu"], data["sigma"])
            spatial = GaussianStats(data["mu_s"], data["sigma_s"])
    else:
        pool, spatial = GaussianStats.of(features.pool), GaussianStats.of(features.spatial)
    return ReferenceBatch(pool, spatial, features.pool)


def compute_metrics(reference: ReferenceBatch, samples: InceptionFeatures,
                    device: torch.device | str = "cpu", half_distances: bool = True
                    ) -> dict[str, float]:
    """FID, sFID, IS, precision and recall of sample features against a reference batch."""
    precision, recall = precision_recall(reference.pool_features, samples.pool,
                                         half=half_distances, device=device)
    return {
        "fid": frechet_distance(GaussianStats.of(samples.pool), reference.pool),
        "sfid": frechet_distance(GaussianStats.of(samples.spatial), reference.spatial),
        "inception_score": inception_score(samples.logits),
        "precision": precision,
        "recall": recall,
    }


def write_report(path: str | Path, report: dict[str, Any]) -> Path:
    """The metrics as indented JSON (atomic write)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, (json.dumps(report, indent=2, sort_keys=True) + "\n").encode())
    return path
