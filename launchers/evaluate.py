"""FID, sFID, Inception Score, precision and recall of generated images, as ADM's evaluator.

  python launchers/evaluate.py --ref VIRTUAL_imagenet256_labeled.npz \
      --samples samples/sfd_xl/samples.npz \
      --inception-weights pt_inception-2015-12-05-6726825d.pth \
      --out samples/sfd_xl/report.json

--samples is an npz with `arr_0` (uint8 N x H x W x 3), a folder of images, or a feature file
written earlier with --save-features (then no images are read again). The Inception weights are
pytorch-fid's port of the TF-FID graph: https://github.com/mseitzer/pytorch-fid/releases
(pt_inception-2015-12-05-6726825d.pth).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from sfd_scale.eval.inception import load_inception
from sfd_scale.eval.metrics import (compute_features, compute_metrics, is_feature_file,
                                    load_reference, save_features, write_report)
from sfd_scale.logging import get_logger


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ref", required=True, help="ADM reference batch .npz (or a feature file)")
    parser.add_argument("--samples", required=True,
                        help="samples .npz, image folder or feature file")
    parser.add_argument("--inception-weights", default=None,
                        help="pt_inception-2015-12-05-6726825d.pth (not needed for feature files)")
    parser.add_argument("--out", required=True, help="JSON report path")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--device", default="auto", help="auto: cuda if available, else cpu")
    parser.add_argument("--save-features", default=None, metavar="NPZ",
                        help="also write the samples' Inception features here")
    parser.add_argument("--fp32-distances", action="store_true",
                        help="precision/recall distances in float32 instead of ADM's float16")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    log = get_logger()
    device = torch.device(args.device if args.device != "auto"
                          else ("cuda" if torch.cuda.is_available() else "cpu"))
    needs_net = not (is_feature_file(args.ref) and is_feature_file(args.samples))
    inception = None
    if needs_net:
        if args.inception_weights is None:
            raise SystemExit("--inception-weights is required to read images "
                             "(pt_inception-2015-12-05-6726825d.pth from the pytorch-fid releases)")
        inception = load_inception(args.inception_weights).to(device)
    reference = load_reference(args.ref, inception, device, args.batch_size, progress=True)
    samples = compute_features(args.samples, inception, device, args.batch_size, progress=True)
    if args.save_features:
        save_features(args.save_features, samples)
    metrics = compute_metrics(reference, samples, device, half_distances=not args.fp32_distances)
    report = {**metrics, "num_samples": len(samples), "num_reference": len(reference.pool_features),
              "reference": str(Path(args.ref).resolve()),
              "samples": str(Path(args.samples).resolve()),
              "inception_weights": str(Path(args.inception_weights).resolve())
              if args.inception_weights else None,
              "pr_distances": "float32" if args.fp32_distances else "float16"}
    write_report(args.out, report)
    log.info("FID %.4f  sFID %.4f  IS %.2f  precision %.4f  recall %.4f  -> %s", metrics["fid"],
             metrics["sfid"], metrics["inception_score"], metrics["precision"], metrics["recall"],
             args.out)


if __name__ == "__main__":
    main()
