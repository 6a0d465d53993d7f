"""Time the optimizer part of a step: clip + torch fused AdamW + EMA lerp, against the fused
AdamW + clip + EMA kernel (kernels/adamw_ema.py), on tensors shaped like the model's parameters.

  python launchers/bench_optimizer.py --config configs/sfd_xxl.yaml          # GPU
  TRITON_INTERPRET=1 python launchers/bench_optimizer.py --set model.size=custom --set model.depth=1 \\
      --set model.hidden_size=32 --set model.num_heads=2 --steps 2            # CPU, tiny (tests)

Prints milliseconds per step and the effective bandwidth of each (bytes each must move: 48 and 36
per parameter).
"""
from __future__ import annotations

import argparse
import statistics

import torch

from sfd_scale.bench import _timed, bench_config, build_model_meta
from sfd_scale.logging import get_logger
from sfd_scale.parallel.distributed import clip_grads_and_check
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
    from sfd_scale.kernels.adamw_ema import AdamWEMA  # after TRITON_INTERPRET is known

    shapes = [p.shape for p in build_model_meta(cfg.model).parameters() if p.requires_grad]
    numel = sum(s.numel() for s in shapes)
    hyper = dict(lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2), eps=1e-8,
                 weight_decay=cfg.optim.weight_decay)
    loss = torch.zeros((), device=device)

    def tensors() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        params = [torch.randn(s, device=device).requires_grad_() for s in shapes]
        for p in params:
            p.grad = torch.randn_like(p)
        return params, [p.detach().clone() for p in params]

    params, ema = tensors()
    torch_opt = torch.optim.AdamW(params, fused=device.type == "cuda", foreach=device.type != "cuda", **hyper)

    def unfused() -> None:
        clip_grads_and_check([p.grad for p in params], cfg.optim.max_grad_norm, loss, sharded=False)
        torch_opt.step()
        torch._foreach_lerp_(ema, [p.detach() for p in params], 1.0 - cfg.train.ema_decay)

    fparams, fema = tensors()
    fused_opt = AdamWEMA(fparams, fema, cfg.train.ema_decay, **hyper)
    grads = [p.grad for p in fparams]

    def fused() -> None:
        norm = torch.stack([n.float() for n in torch._foreach_norm(grads)]).pow(2).sum().sqrt()
        coef = (cfg.optim.max_grad_norm / (norm + 1e-6)).clamp(max=1.0)
        fused_opt.step(grad_scale=coef, skip=(~torch.isfinite(norm)).float())

    print(f"{device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
          f"{numel / 1e6:.1f} M parameters in {len(shapes)} tensors")
    print("| optimizer part | ms/step | GB/s (bytes it must move) |\n|---|---|---|")
    for name, run, per_param in (("clip + AdamW + EMA lerp", unfused, 48), ("fused kernel", fused, 36)):
        run()
        times = [_timed(run, device) for _ in range(args.steps)]
        median = statistics.median(times)
        print(f"| {name} | {median * 1e3:.2f} | {per_param * numel / median / 1e9:.0f} |")


if __name__ == "__main__":
    main()
