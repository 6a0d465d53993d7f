"""ADM metrics: Frechet distance, IS, k-NN precision/recall, image-set readers, JSON report."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sfd_scale.eval import metrics
from sfd_scale.eval.inception import InceptionFeatures
from sfd_scale.eval.metrics import (GaussianStats, compute_features, compute_metrics,
                                    frechet_distance, inception_score, iter_folder_images,
                                    iter_npz_images, load_reference, manifold_radii,
                                    precision_recall, save_features)

ROOT = Path(__file__).resolve().parents[1]


def direct_frechet(a: GaussianStats, b: GaussianStats) -> float:
    """tr((S1 S2)^1/2) as the sum of sqrt(eigenvalues) of the symmetric S1^1/2 S2 S1^1/2."""
    w, v = np.linalg.eigh(a.sigma)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    middle = root @ b.sigma @ root
    eig = np.linalg.eigvalsh((middle + middle.T) / 2)
    diff = a.mu - b.mu
    return float(diff @ diff + np.trace(a.sigma) + np.trace(b.sigma)
                 - 2 * np.sqrt(np.clip(eig, 0, None)).sum())


# ----------------------------------------------------------------------------------------------
# Frechet distance
# ----------------------------------------------------------------------------------------------
def test_one_dimensional_frechet_distance_by_hand():
    # N(0, 1) vs N(3, 4): 3^2 + 1 + 4 - 2 sqrt(1 * 4) = 10.
    a = GaussianStats(np.array([0.0]), np.array([[1.0]]))
    b = GaussianStats(np.array([3.0]), np.array([[4.0]]))
    assert frechet_distance(a, b) == pytest.approx(10.0, abs=1e-12)


@pytest.mark.parametrize("n, d", [(500, 16), (10, 32)])  # (10, 32): rank-9 covariances
def test_frechet_distance_matches_a_direct_eigen_computation(n, d):
    rng = np.random.default_rng(n)
    a = GaussianStats.of(rng.normal(size=(n, d)))
    b = GaussianStats.of(rng.normal(size=(n, d)) * 1.5 + 0.3)
    if n < d:
        assert np.linalg.matrix_rank(a.sigma) == n - 1
    assert frechet_distance(a, b) == pytest.approx(direct_frechet(a, b), rel=1e-7)


def test_statistics_are_mean_and_unbiased_covariance():
    x = np.array([[0.0, 1.0], [2.0, 1.0], [4.0, 4.0]])
    stats = GaussianStats.of(x)
    np.testing.assert_allclose(stats.mu, [2.0, 2.0])
    np.testing.assert_allclose(stats.sigma, [[4.0, 3.0], [3.0, 3.0]])   # divides by N - 1


def test_fid_of_a_set_against_itself_is_zero():
    stats = GaussianStats.of(np.random.default_rng(0).normal(size=(300, 32)))
    assert abs(frechet_distance(stats, stats)) < 1e-9


def test_singular_product_falls_back_to_an_epsilon_offset(monkeypatch, caplog):
    rng = np.random.default_rng(3)
    a = GaussianStats.of(rng.normal(size=(6, 8)))
    b = GaussianStats.of(rng.normal(size=(6, 8)))
    real_sqrtm = metrics.linalg.sqrtm
    calls = []

    def first_call_not_finite(matrix):
        calls.append(matrix)
        return np.full_like(matrix, np.inf) if len(calls) == 1 else real_sqrtm(matrix)

    monkeypatch.setattr(metrics.linalg, "sqrtm", first_call_not_finite)
    eps = 1e-2  # large enough to move the result measurably
    got = frechet_distance(a, b, eps=eps)
    assert len(calls) == 2 and "adding" in caplog.text
    # The means and traces use the original covariances; only the square root sees the offset.
    offset = (GaussianStats(a.mu, a.sigma + eps * np.eye(8)),
              GaussianStats(b.mu, b.sigma + eps * np.eye(8)))
    root_term = direct_frechet(*offset) - np.trace(offset[0].sigma) - np.trace(offset[1].sigma)
    expected = root_term + np.trace(a.sigma) + np.trace(b.sigma)
    assert got == pytest.approx(expected, rel=1e-8)
    assert got != pytest.approx(direct_frechet(a, b), rel=1e-6)


def test_mismatched_statistics_are_refused():
    with pytest.raises(ValueError, match="do not match"):
        frechet_distance(GaussianStats(np.zeros(3), np.eye(3)),
                         GaussianStats(np.zeros(2), np.eye(2)))


# ----------------------------------------------------------------------------------------------
# Inception Score
# ----------------------------------------------------------------------------------------------
def test_inception_score_of_uniform_logits_is_one():
    assert inception_score(np.zeros((20, 1008))) == pytest.approx(1.0, abs=1e-12)


def test_inception_score_of_confident_distinct_classes_is_the_class_count():
    # Sample i is certain of class i: KL = log C per sample, so IS = C per split.
    logits = np.full((10, 10), -1e4)
    np.fill_diagonal(logits, 0.0)
    assert inception_score(logits) == pytest.approx(10.0, rel=1e-9)
    assert inception_score(logits, split_size=5) == pytest.approx(5.0, rel=1e-9)


# ----------------------------------------------------------------------------------------------
# Precision and recall
# ----------------------------------------------------------------------------------------------
def line(*xs: float) -> np.ndarray:
    """Points on the x axis of a 2-D feature space."""
    return np.stack([np.array(xs, dtype=np.float32), np.zeros(len(xs), np.float32)], axis=1)


def test_radii_are_squared_distances_to_the_kth_neighbour_counting_self():
    radii = manifold_radii(torch.as_tensor(line(*range(10))), k=3)
    # Ends reach their 3rd neighbour at distance 3, the others at distance 2.
    assert radii.tolist() == [9.0, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0, 9.0]


@pytest.mark.parametrize("half", [True, False])
@pytest.mark.parametrize("batch_size", [10000, 3])
def test_precision_recall_on_constructed_sets(half, batch_size):
    ref = line(*range(10))                      # manifold: [-3, 12]
    near = [0.0, 0.5, 1.0, 1.5]                 # balls cover [-1.5, 3]: ref 0..3 -> recall 0.4
    far = [50.0, 60.0, 70.0, 80.0]              # outside the reference manifold
    samples = line(*near, *far)                 # precision 4 / 8
    p, r = precision_recall(ref, samples, batch_size=batch_size, half=half)
    assert (p, r) == (0.5, 0.4)


def test_distances_overflowing_float16_are_recomputed_in_float32():
    u, v = torch.zeros(1, 2), torch.tensor([[300.0, 300.0], [1.0, 2.0]])
    d = metrics.pairwise_sq_distances(u, v, half=True)          # 180000 > float16's 65504
    assert d.dtype == torch.float32 and d.tolist() == [[180000.0, 5.0]]


def test_identical_sets_score_one_and_disjoint_far_sets_zero():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 16)).astype(np.float32)
    assert precision_recall(x, x) == (1.0, 1.0)
    # 1000 apart: float16 distances overflow, so the float32 fallback decides.
    assert precision_recall(x, x + 1000.0) == (0.0, 0.0)


# ----------------------------------------------------------------------------------------------
# Image sets, reference batches, report
# ----------------------------------------------------------------------------------------------
def test_npz_images_stream_in_batches(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, size=(7, 4, 5, 3), dtype=np.uint8)
    for name, save in (("plain.npz", np.savez), ("packed.npz", np.savez_compressed)):
        save(tmp_path / name, arr_0=images)
        batches = list(iter_npz_images(tmp_path / name, batch_size=3))
        assert [len(b) for b in batches] == [3, 3, 1]
        np.testing.assert_array_equal(np.concatenate(batches), images)


def test_truncated_or_wrong_npz_is_reported(tmp_path):
    np.savez(tmp_path / "float.npz", arr_0=np.zeros((2, 4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        list(iter_npz_images(tmp_path / "float.npz", 2))
    np.savez(tmp_path / "ok.npz", arr_0=np.zeros((2, 4, 4, 3), np.uint8))
    data = (tmp_path / "ok.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.npz"):
        list(iter_npz_images(tmp_path / "cut.npz", 2))


def test_folder_images_in_name_order(tmp_path):
    images = np.random.default_rng(1).integers(0, 256, size=(3, 6, 6, 3), dtype=np.uint8)
    for i, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / f"{i:06d}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    np.testing.assert_array_equal(np.concatenate(list(iter_folder_images(tmp_path, 2))), images)


class MeanColourNet(torch.nn.Module):
    """A stand-in feature network: features are functions of each image's mean colour."""

    def forward(self, x):
        m = x.mean(dim=(2, 3))                                        # (B, 3)
        pool = torch.cat([m, m ** 2 / 255], 1)                        # (B, 6)
        return pool, pool[:, :4], pool[:, :3]


def test_reference_uses_stored_statistics_and_image_features(tmp_path):
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, size=(12, 8, 8, 3), dtype=np.uint8)
    stored = dict(mu=np.arange(6.0), sigma=np.eye(6) * 2, mu_s=np.arange(4.0), sigma_s=np.eye(4))
    np.savez(tmp_path / "ref.npz", arr_0=images, **stored)
    ref = load_reference(tmp_path / "ref.npz", MeanColourNet(), batch_size=5)
    np.testing.assert_array_equal(ref.pool.mu, stored["mu"])
    np.testing.assert_array_equal(ref.spatial.sigma, stored["sigma_s"])
    colours = images.astype(np.float64).mean(axis=(1, 2))
    np.testing.assert_allclose(ref.pool_features[:, :3], colours, rtol=1e-5)
    with pytest.raises(FileNotFoundError, match="VIRTUAL_imagenet256_labeled.npz"):
        load_reference(tmp_path / "VIRTUAL_imagenet256_labeled.npz", MeanColourNet())


def test_feature_files_round_trip_and_serve_as_references(tmp_path):
    rng = np.random.default_rng(4)
    feats = InceptionFeatures(rng.normal(size=(40, 6)).astype(np.float32),
                              rng.normal(size=(40, 4)).astype(np.float32),
                              rng.normal(size=(40, 3)).astype(np.float32))
    path = save_features(tmp_path / "ref_features.npz", feats)
    again = compute_features(path, inception=None)
    np.testing.assert_array_equal(again.spatial, feats.spatial)
    ref = load_reference(path, inception=None)
    result = compute_metrics(ref, feats)
    assert abs(result["fid"]) < 1e-9 and abs(result["sfid"]) < 1e-9
    assert (result["precision"], result["recall"]) == (1.0, 1.0)
    assert result["inception_score"] == pytest.approx(inception_score(feats.logits))


def test_evaluate_launcher_writes_a_json_report(tmp_path):
    rng = np.random.default_rng(5)
    ref = InceptionFeatures(rng.normal(size=(30, 6)).astype(np.float32),
                            rng.normal(size=(30, 4)).astype(np.float32),
                            np.zeros((30, 3), np.float32))
    shifted = InceptionFeatures(ref.pool + 1.0, ref.spatial, ref.logits)
    save_features(tmp_path / "ref.npz", ref)
    save_features(tmp_path / "samples.npz", shifted)
    out = subprocess.run([sys.executable, "launchers/evaluate.py",
                          "--ref", str(tmp_path / "ref.npz"),
                          "--samples", str(tmp_path / "samples.npz"),
                          "--out", str(tmp_path / "report.json")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["fid"] == pytest.approx(6.0, abs=1e-6)     # a shift of 1 in each of 6 dims
    assert report["sfid"] == pytest.approx(0.0, abs=1e-9)
    assert report["inception_score"] == pytest.approx(1.0)
    assert report["num_samples"] == 30 and report["num_reference"] == 30
