"""train.cuda_graph: the whole step replayed as CUDA graphs gives the ordinary step's numbers.

On the CPU the graphed step runs its plain twin (the same two functions on fixed input tensors,
no capture); on a GPU the same tests capture and replay for real, including the capture made
again after a checkpoint load replaced the optimizer state.
"""
from __future__ import annotations

import json

import pytest
import torch

from dist_worker import assert_ranks_match_one_process, train_on_two_ranks
from fault_worker import assert_identical
from fixtures import tiny_sfd_config, triton_interpreter_without_gpu, write_latent_folder  # noqa: F401
from sfd_scale.parallel.dims import ParallelDims, check_config_fits
from sfd_scale.train.step_graph import GraphedStep
from sfd_scale.train.trainer import Trainer

CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_latent_folder(tmp_path_factory.mktemp("graph") / "latents")


def _config(data_dir, cuda_graph: bool, bf16_weights: bool = False, fp8: str = "none"):
    optim = {"lr": 1e-3, "warmup_steps": 3, "fused_ema": True, "bf16_weights": bf16_weights}
    model = {"fp8": fp8, "mlp_ratio": 3.0} if fp8 != "none" else {}  # FP8 MLP linears (and the fused SwiGLU)
    return tiny_sfd_config(data_dir, optim=optim, model=model,
                           train={"async_metrics": True, "cuda_graph": cuda_graph, "log_every": 2, "ckpt_every": 3,
                                  "precision": "bf16" if bf16_weights else "auto"})


def _poison(trainer: Trainer, steps: set[int]) -> None:
    """NaN latents in the batches of these (1-based) steps: steps the device must skip."""
    batches = trainer.batches

    def poisoned():
        for x, y, feats in batches:
            yield (x * float("nan") if trainer.step + 1 in steps else x), y, feats

    trainer.batches = poisoned()


def _state(trainer: Trainer) -> dict:
    engine = trainer.engine
    return {"model": engine.unwrap().state_dict(), "ema": engine.ema_model().state_dict(),
            "optimizer": engine.optimizer.state_dict()["state"]}


def _rows(run_dir) -> list[dict]:
    keys = ("step", "mse", "cos", "repa", "loss", "grad_norm", "lr", "skipped_steps")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: "nan" if row[k] != row[k] else row[k] for k in keys} for row in rows]


def _assert_same(got, want) -> None:
    """Bit-identical on the CPU (the same operators in the same order); on a GPU within float
    noise, since kernels with atomic additions (the embedding's backward) may sum in another order."""
    if not CUDA:
        assert_identical(got, want)
        return
    for name in want:
        for key in want[name]:
            a, b = got[name][key], want[name][key]
            if isinstance(b, dict):
                for k in b:
                    torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
            else:
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("bf16_weights, fp8", [(False, "none"), (True, "none"), (True, "delayed")],
                         ids=["fp32-weights", "bf16-weight-copies", "bf16-weight-copies-delayed-fp8"])
def test_graphed_steps_give_the_ordinary_numbers_weights_skips_and_survive_a_state_reload(tmp_path, data_dir,
                                                                                          bf16_weights, fp8):
    # Delayed FP8 adds in-place state to the captured step: the amax histories, folded by the
    # model's forward hook, and written by the forward and backward.
    runs = {}
    for graphed in (False, True):
        trainer = Trainer(_config(data_dir, graphed, bf16_weights, fp8), tmp_path / str(graphed))
        _poison(trainer, {2, 5})  # skipped during the warm-up (2) and after the capture (5)
        trainer.fit(6, final_checkpoint=False)
        # What a guard rollback does: the optimizer state gets new tensors under a captured step.
        trainer.engine.load(trainer.store.step_dir(3))
        trainer.fit(9, final_checkpoint=False)
        runs[graphed] = trainer
    plain, graphed = runs[False], runs[True]
    assert plain.skipped_steps == graphed.skipped_steps == 2
    _assert_same(_state(graphed), _state(plain))
    if CUDA:
        for got, want in zip(_rows(tmp_path / "True"), _rows(tmp_path / "False")):
            assert got == pytest.approx(want, rel=1e-4)
        assert graphed.graphed_step.captures == 2   # after the warm-up, and again after the load
    else:
        assert _rows(tmp_path / "True") == _rows(tmp_path / "False")
        assert graphed.graphed_step.captures == 0   # the plain twin
    assert [r["skipped_steps"] for r in _rows(tmp_path / "True")] == [1, 1, 2, 2, 2]


@pytest.mark.distributed
def test_two_ddp_ranks_with_graphed_steps_match_one_process(tmp_path, data_dir):
    # Under DDP the captured step holds DDP's all-reduces; it waits 11 eager steps before capturing.
    cfg = _config(data_dir, cuda_graph=True)
    single = Trainer(cfg, tmp_path / "single")
    single.fit(4)
    ddp = train_on_two_ranks(tmp_path, cfg, "ddp", "ddp", 4)
    assert ddp["graph_warmup_steps"] == 11 and single.graphed_step.warmup_steps == 2
    assert_ranks_match_one_process(ddp, single, steps=(2, 4))


def test_a_graphed_step_refuses_inputs_of_another_shape_or_name():
    from sfd_scale.kernels.adamw_ema import AdamWEMA

    weight = torch.zeros(4, requires_grad=True)
    optimizer = AdamWEMA([weight], [torch.zeros(4)], ema_decay=0.9)
    step = GraphedStep(lambda inputs: inputs["x"].sum().reshape(1), lambda losses, lr: losses * lr, optimizer,
                       torch.device("cpu"))
    assert step({"x": torch.ones(3)}, 0.5).tolist() == [1.5]
    assert step({"x": torch.full((3,), 2.0)}, 0.5).tolist() == [3.0]   # new values, same fixed tensor
    with pytest.raises(ValueError, match=r"input 'x' is \(4,\) torch.float32, the step was made for \(3,\)"):
        step({"x": torch.ones(4)}, 0.5)
    with pytest.raises(ValueError, match="the same inputs every call"):
        step({"y": torch.ones(3)}, 0.5)
    with pytest.raises(ValueError, match="needs the fused AdamW"):
        GraphedStep(lambda i: i, lambda losses, lr: losses, torch.optim.AdamW([weight]), torch.device("cpu"))


class _RecordedGraphs(GraphedStep):
    """GraphedStep's own sequencing, with its three CUDA operations recorded instead of run."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.capture, self.events = True, []

    def _run_on_stream(self) -> torch.Tensor:
        self.events.append("eager")
        return self.update(self.gradients(self._inputs), self._lr)

    def _capture_graphs(self) -> tuple:
        self.events.append("capture")
        self._output = self.update(self.gradients(self._inputs), self._lr)  # what a capture records
        return "gradients graph", "update graph"

    def _replay(self) -> torch.Tensor:
        self.events.append("replay")
        return self._output


def test_a_graphed_step_warms_up_captures_once_and_captures_again_after_a_state_load():
    from sfd_scale.kernels.adamw_ema import AdamWEMA

    weight = torch.zeros(4, requires_grad=True)
    optimizer = AdamWEMA([weight], [torch.zeros(4)], ema_decay=0.9)
    step = _RecordedGraphs(lambda inputs: inputs["x"].sum().reshape(1), lambda losses, lr: losses * lr, optimizer,
                           torch.device("cpu"), warmup_steps=2)
    for _ in range(4):
        step({"x": torch.ones(3)}, 0.5)
    assert step.events == ["eager", "eager", "capture", "replay", "replay"] and step.captures == 1
    optimizer.load_state_dict(optimizer.state_dict())  # new state tensors: the graphs are stale
    step.events.clear()
    for _ in range(4):
        step({"x": torch.ones(3)}, 0.5)
    assert step.events == ["eager", "eager", "capture", "replay", "replay"] and step.captures == 2
    with pytest.raises(ValueError, match="at least one eager warm-up step"):
        GraphedStep(lambda i: i, lambda losses, lr: losses, optimizer, torch.device("cpu"), warmup_steps=0)


@pytest.mark.parametrize("settings, message", [
    ({"train": {"cuda_graph": True}}, "train.cuda_graph needs train.async_metrics=true"),
    ({"optim": {"fused_ema": True}, "train": {"cuda_graph": True, "async_metrics": True},
      "parallel": {"engine": "fsdp2"}}, r"parallel.engine local or ddp without tensor parallelism \(got fsdp2"),
    ({"optim": {"fused_ema": True}, "train": {"cuda_graph": True, "async_metrics": True},
      "parallel": {"grad_accum_steps": 2}}, r"parallel.grad_accum_steps=1 \(got 2\)"),
    ({"optim": {"fused_ema": True}, "train": {"cuda_graph": True, "async_metrics": True},
      "model": {"compile": "blocks", "compile_mode": "reduce-overhead"}}, "other than reduce-overhead"),
])
def test_settings_a_captured_step_cannot_run_with_are_refused(data_dir, settings, message):
    cfg = tiny_sfd_config(data_dir, **settings)
    with pytest.raises(ValueError, match=message):
        check_config_fits(cfg, ParallelDims(world_size=1, rank=0, local_rank=0, tp=1))
