"""A whole training step replayed as CUDA graphs: the host launches two graphs, not every kernel.

Why: at XXL on an H100 the compiled step leaves the GPU idle 11.4 of 105 ms between kernels, and
the trainer loop, whose host also reads batches, draws noise and logs, trails that step by 46 ms
(docs/benchmarks.md). Replayed, a step costs the host a few copies and two launches, whatever
Python, autograd and the compiled regions would have cost it.

A capture records kernels with their arguments and addresses, so:
- inputs (batch, random draws, learning rate) are copied into tensors that never move, and the
  step draws nothing itself (`SFDLoss.draw` runs before, on the host's generators);
- the step reads nothing back to the host: it is the sync-free step (fused AdamW + EMA, skip
  decided on the device, `train.async_metrics`);
- its first calls run eagerly on the capture stream (warm-up: compilation, autotuning, the
  optimizer's state, cuBLAS workspaces), then it is captured. Under DDP the warm-up is 11 steps
  (DDP rebuilds its buckets and samples its timers in its first iterations), and DDP itself must be
  built on the capture stream: it keeps the gradient-accumulation nodes of the parameters, which
  remember the stream they were made on (`capture_stream`);
- the fused optimizer's address tables must be on the device before its capture, yet they hold
  the gradients' addresses, which only exist once the backward has been captured: the step is
  two graphs, gradients (forward, loss, backward) then update (norm, clip, AdamW, EMA), with
  `AdamWEMA.freeze_tables` between the two captures;
- loading a checkpoint gives the optimizer state new tensors (`AdamWEMA.state_version` moves):
  the graphs are then dropped and made again after a new warm-up. Weights and EMA are loaded in
  place and keep their addresses.

Without CUDA (`capture=False`, the plain twin) the same two functions run eagerly on the same
fixed input tensors; CPU tests compare that with the trainer's ordinary step.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Callable, Iterator

import torch

log = logging.getLogger(__name__)

Gradients = Callable[[dict[str, torch.Tensor]], torch.Tensor]
"""Fixed inputs -> the loss terms (device tensor), gradients left in the parameters."""
Update = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(loss terms, learning rate as a device scalar) -> the step's numbers (device tensor)."""


WARMUP_STEPS = 2
"""Eager steps before a capture: the first compiles and creates the optimizer's state, the second
runs as every later step will."""
DDP_WARMUP_STEPS = 11
"""Eager steps before a capture under DDP (PyTorch's CUDA-graph notes: DDP's own bookkeeping of
its first iterations must be over)."""


@contextlib.contextmanager
def capture_stream(device: torch.device, wanted: bool) -> Iterator[torch.cuda.Stream | None]:
    """The stream a `GraphedStep` will warm up and capture on, current inside the block (None, and
    no change, without CUDA or when not `wanted`). Build what keeps autograd nodes across steps
    (DDP) inside it; afterwards the caller's stream waits for what was queued on it."""
    if not wanted or device.type != "cuda":
        yield None
        return
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        yield stream
    torch.cuda.current_stream(device).wait_stream(stream)


class GraphedStep:
    """Runs gradients-then-update on fixed input tensors; on CUDA, after `warmup_steps` eager
    calls, as two captured CUDA graphs. The tensor a call returns is overwritten by the next call."""

    def __init__(self, gradients: Gradients, update: Update, optimizer: torch.optim.Optimizer,
                 device: torch.device, warmup_steps: int = WARMUP_STEPS,
                 stream: torch.cuda.Stream | None = None) -> None:
        if warmup_steps < 1:
            raise ValueError(f"a CUDA-graph step needs at least one eager warm-up step, got {warmup_steps}")
        if not hasattr(optimizer, "freeze_tables"):
            raise ValueError(f"{type(optimizer).__name__} cannot be captured: the step needs the fused "
                             "AdamW + EMA optimizer (optim.fused_ema=true)")
        self.gradients = gradients
        self.update = update
        self.optimizer = optimizer
        self.device = device
        self.capture = device.type == "cuda"
        self.warmup_steps = warmup_steps
        self.captures = 0
        """Times the step was captured (more than one after checkpoint loads)."""
        self._inputs: dict[str, torch.Tensor] = {}
        self._lr = torch.zeros((), dtype=torch.float32, device=device)
        self._stream = (stream or torch.cuda.Stream(device)) if self.capture else None
        self._warm = 0
        self._graphs: tuple[torch.cuda.CUDAGraph, torch.cuda.CUDAGraph] | None = None
        self._losses: torch.Tensor | None = None  # the gradients graph's output, the update graph's input
        self._output: torch.Tensor | None = None
        self._captured_version = -1

    def __call__(self, inputs: dict[str, torch.Tensor], lr: float) -> torch.Tensor:
        """One step on `inputs` (device tensors, the same names and shapes every call) at `lr`."""
        self._copy_in(inputs, lr)
        if not self.capture:
            return self.update(self.gradients(self._inputs), self._lr)
        if self._graphs is not None and self._captured_version != self.optimizer.state_version:
            log.info("optimizer state was reloaded: the step will be captured again after %d eager step(s)",
                     self.warmup_steps)
            self._graphs, self._losses, self._output, self._warm = None, None, None, 0
        if self._graphs is None:
            if self._warm < self.warmup_steps:
                self._warm += 1
                return self._run_on_stream()
            self._graphs = self._capture_graphs()
            self._captured_version = self.optimizer.state_version
            self.captures += 1
            log.info("training step captured as CUDA graphs (capture %d)", self.captures)
        return self._replay()

    def _copy_in(self, inputs: dict[str, torch.Tensor], lr: float) -> None:
        if not self._inputs:
            self._inputs = {name: torch.empty_like(value) for name, value in inputs.items()}
        if inputs.keys() != self._inputs.keys():
            raise ValueError(f"a CUDA-graph step takes the same inputs every call: got {sorted(inputs)}, "
                             f"captured {sorted(self._inputs)}")
        for name, value in inputs.items():
            fixed = self._inputs[name]
            if value.shape != fixed.shape or value.dtype != fixed.dtype:
                raise ValueError(f"a CUDA-graph step takes fixed shapes: input {name!r} is {tuple(value.shape)} "
                                 f"{value.dtype}, the step was made for {tuple(fixed.shape)} {fixed.dtype}")
            fixed.copy_(value, non_blocking=True)
        self._lr.fill_(lr)

    def _run_on_stream(self) -> torch.Tensor:
        """An eager step on the capture stream (warm-up), ordered after the copies into the inputs
        and before whatever the caller queues next."""
        current = torch.cuda.current_stream(self.device)
        self._stream.wait_stream(current)
        with torch.cuda.stream(self._stream):
            out = self.update(self.gradients(self._inputs), self._lr)
        current.wait_stream(self._stream)
        out.record_stream(current)  # the caller reads it on its stream
        return out

    def _capture_graphs(self) -> tuple[torch.cuda.CUDAGraph, torch.cuda.CUDAGraph]:
        """The gradients and update graphs; their outputs stay in `_losses` and `_output`."""
        gradients, update = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        # thread_local: the loader's reader threads may wait on their copy events meanwhile, which
        # the default mode forbids to every thread (autograd's backward thread only launches kernels).
        try:
            with torch.cuda.graph(gradients, stream=self._stream, capture_error_mode="thread_local"):
                self._losses = self.gradients(self._inputs)
            self.optimizer.freeze_tables()  # the gradients now sit in the graph's memory, at fixed addresses
            with torch.cuda.graph(update, pool=gradients.pool(), stream=self._stream,
                                  capture_error_mode="thread_local"):
                self._output = self.update(self._losses, self._lr)
        except RuntimeError as err:
            raise RuntimeError(f"capturing the training step as CUDA graphs failed ({err}); an operation in the "
                               "step cannot be captured: run with train.cuda_graph=false") from err
        return gradients, update

    def _replay(self) -> torch.Tensor:
        gradients, update = self._graphs
        gradients.replay()
        update.replay()
        return self._output
