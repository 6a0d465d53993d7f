"""Triton kernels against their plain-PyTorch twins, values and gradients in float32 and bfloat16.

Without a GPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1 for this file's tests);
without Triton those tests skip. The twins are checked against the model's own modules first, so
a kernel that equals its twin equals the model.
"""
import copy
import re

import pytest
import torch

from sfd_scale.kernels import triton_installed
from sfd_scale.kernels.reference import rmsnorm_modulate_reference, rope_reference, swiglu_reference
from sfd_scale.models.layers import RMSNorm, Rope2D, SwiGLU, modulate
from fixtures import triton_interpreter_without_gpu  # noqa: F401  (autouse, module scope)


needs_triton = pytest.mark.skipif(not triton_installed(), reason="Triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP8_SHAPES = [(100, 70), (128, 96)]
"""(rows, columns) the FP8 kernel tests cast: partial tiles on both axes, and sizes divisible by 16
as XXL's are. On a GPU Triton compiles each kind apart (it specialises sizes divisible by 16 into
wider accesses), and a miscompile can hit one and spare the other (docs/benchmarks.md, session 10)."""
UNIT_ROUNDOFF = {torch.float32: 2.0 ** -20, torch.bfloat16: 2.0 ** -8}
"""Allowed error beyond twice the twin's, relative to the largest true value: a few units in the
last place of the inputs' dtype. (Triton's interpreter rounds float32 -> bfloat16 toward zero, a
GPU to nearest, so interpreted bf16 results may be up to one unit further off than PyTorch's.)"""


def _inputs(shapes, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(s, generator=g) * scale + shift).to(DEVICE, dtype).requires_grad_()
            for s, scale, shift in shapes]


def _values_and_grads(fn, inputs, grad_out_seed=1):
    out = fn(*inputs)
    g = torch.Generator().manual_seed(grad_out_seed)
    grad_out = torch.randn(out.shape, generator=g).to(out.device, out.dtype)
    grads = torch.autograd.grad(out, inputs, grad_out)
    return [out, *grads]


def _check_against_twin(kernel, twin, inputs, dtype):
    """The kernel is at least about as accurate as the twin run in the same dtypes: both are
    compared with the twin evaluated in float64 on the same (rounded) inputs."""
    truth_inputs = [x.detach().double().requires_grad_() for x in inputs]
    truth = _values_and_grads(twin, truth_inputs)
    got = _values_and_grads(kernel, inputs)
    ref = _values_and_grads(twin, inputs)
    names = ["output"] + [f"grad of input {i}" for i in range(len(inputs))]
    for name, k, r, t in zip(names, got, ref, truth):
        assert k.shape == t.shape and k.dtype == r.dtype, name
        err_kernel = (k.double() - t).abs().max().item()
        err_twin = (r.double() - t).abs().max().item()
        bound = 2 * err_twin + UNIT_ROUNDOFF[dtype] * t.abs().max().item()
        assert err_kernel <= bound, f"{name}: kernel error {err_kernel:.3g} > {bound:.3g} (twin {err_twin:.3g})"


# ---------------------------------------------------------------------------------------------
# The twins are the model's arithmetic
# ---------------------------------------------------------------------------------------------
def test_twins_equal_the_model_layers():
    torch.manual_seed(0)
    norm = RMSNorm(16)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x, shift, scale = torch.randn(2, 5, 16), torch.randn(2, 16), torch.randn(2, 16)
    assert torch.equal(rmsnorm_modulate_reference(x, norm.weight, shift, scale, norm.eps),
                       modulate(norm(x), shift, scale))
    mlp = SwiGLU(16, 24)
    h = torch.randn(2, 5, 48)
    assert torch.equal(swiglu_reference(h), mlp.activation(h))
    rope = Rope2D(head_dim=8, grid=3)
    q = torch.randn(2, 2, 9, 8)
    assert torch.equal(rope_reference(q, rope.freqs_cos, rope.freqs_sin), rope(q))


# ---------------------------------------------------------------------------------------------
# Kernels against twins
# ---------------------------------------------------------------------------------------------
@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_modulate_kernel(dtype):
    from sfd_scale.kernels.rmsnorm_modulate import rmsnorm_modulate

    # 20 tokens: two backward chunks of 16 rows, the second partly masked; D = 48 is no power of 2.
    x, shift, scale = _inputs([((2, 20, 48), 2.0, 0.0), ((2, 48), 0.5, 0.0), ((2, 48), 0.5, 0.0)], dtype)
    (weight,) = _inputs([((48,), 0.2, 1.0)], torch.float32, seed=3)  # fp32 like the model's weight
    _check_against_twin(lambda x, w, sh, sc: rmsnorm_modulate(x, w, sh, sc),
                        lambda x, w, sh, sc: rmsnorm_modulate_reference(x, w, sh, sc),
                        [x, weight, shift, scale], dtype)


@needs_triton
def test_rmsnorm_modulate_writes_the_requested_dtype():
    from sfd_scale.kernels.rmsnorm_modulate import rmsnorm_modulate

    x, shift, scale, weight = _inputs([((1, 3, 32), 1.0, 0.0), ((1, 32), 0.5, 0.0), ((1, 32), 0.5, 0.0),
                                       ((32,), 0.2, 1.0)], torch.float32)
    out = rmsnorm_modulate(x, weight, shift, scale, out_dtype=torch.bfloat16)
    want = rmsnorm_modulate_reference(x, weight, shift, scale)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), want, rtol=2 ** -7, atol=0.0)   # one bf16 rounding
    with pytest.raises(ValueError, match=r"shift/scale \(B, D\)"):
        rmsnorm_modulate(x, weight, shift[:, :16], scale)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_kernel(dtype):
    from sfd_scale.kernels.swiglu import swiglu

    (h,) = _inputs([((3, 5, 2 * 24), 2.0, 0.0)], dtype)
    _check_against_twin(swiglu, swiglu_reference, [h], dtype)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [8, 12])
def test_rope_kernel(dtype, head_dim):
    from sfd_scale.kernels.rope import rope

    tables = Rope2D(head_dim, grid=3).to(DEVICE)
    cos, sin = tables.freqs_cos, tables.freqs_sin
    # 2 x 3 x 9 = 54 rows: the last program of 32 rows is partly masked; 12 has 6 (of 8) pairs.
    (x,) = _inputs([((2, 3, 9, head_dim), 1.0, 0.0)], dtype)

    def twin(q):  # float64 tables for the float64 truth, the model's float32 tables otherwise
        return rope_reference(q, *(t.to(torch.promote_types(q.dtype, t.dtype)) for t in (cos, sin)))

    _check_against_twin(lambda q: rope(q, cos, sin), twin, [x], dtype)


@needs_triton
def test_rope_refuses_what_it_cannot_do():
    from sfd_scale.kernels.rope import rope

    tables = Rope2D(8, grid=3)
    with pytest.raises(ValueError, match="tables"):
        rope(torch.randn(1, 1, 4, 8), tables.freqs_cos, tables.freqs_sin)      # 4 tokens, 9 positions
    with pytest.raises(ValueError, match="no gradient"):
        rope(torch.randn(1, 1, 9, 8), tables.freqs_cos.requires_grad_(), tables.freqs_sin)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fp8_dtype", [torch.float8_e5m2, torch.float8_e4m3fn])
@pytest.mark.parametrize("shape", FP8_SHAPES)
def test_fp8_cast_transpose_kernel(dtype, fp8_dtype, shape):
    from sfd_scale.kernels.fp8_cast import fp8_cast_transpose
    from sfd_scale.kernels.reference import fp8_cast_transpose_reference

    # A few values beyond the FP8 range saturate.
    rows, cols = shape
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(rows, cols, generator=g) * 3).to(DEVICE, dtype)
    x[3, 5], x[rows - 3, cols - 1] = 1e6, -1e6
    scale = torch.tensor(torch.finfo(fp8_dtype).max / 4e5, device=DEVICE)
    for sums_dtype in (dtype, None):
        slots = torch.full((2, 3), -1.0, device=DEVICE)  # the amax lands in the slot, nowhere else
        got = fp8_cast_transpose(x, scale, fp8_dtype, slots[0, 1:2], sums_dtype)
        want = fp8_cast_transpose_reference(x, scale, fp8_dtype, slots[1, 1:2], sums_dtype)
        for name, k, r in zip(("cast", "transposed"), got[:2], want[:2]):
            assert k.dtype == fp8_dtype and k.shape == r.shape, name
            assert torch.equal(k.view(torch.uint8), r.view(torch.uint8)), name   # bit for bit
        assert got[0][3, 5].item() == torch.finfo(fp8_dtype).max and got[1][cols - 1, rows - 3].item() < 0
        assert torch.equal(slots[:, 1], x.abs().amax().float().expand(2))      # amax: exact
        assert (slots[:, [0, 2]] == -1).all()
        assert got[2].shape == want[2].shape and got[2].dtype == want[2].dtype
        torch.testing.assert_close(got[2], want[2], rtol=1e-6 if dtype == torch.float32 else 1e-2, atol=1e-3)
    for bad in (float("nan"), float("inf")):  # a step the guard skips records 0, never poisons its history
        y = x.clone()
        y[50, 7] = bad
        slot = torch.full((1,), -1.0, device=DEVICE)
        fp8_cast_transpose(y, scale, fp8_dtype, slot, None)
        assert slot.item() == 0.0
    with pytest.raises(ValueError, match="a matrix and a one-element scale"):
        fp8_cast_transpose(x[None], scale, fp8_dtype, slots[0, :1], None)
    with pytest.raises(ValueError, match="one-element float32"):
        fp8_cast_transpose(x, scale, fp8_dtype, slots[0], None)


@needs_triton
@pytest.mark.parametrize("fp8_dtype", [torch.float8_e5m2, torch.float8_e4m3fn])
def test_fp8_transpose_kernel_moves_every_byte(fp8_dtype):
    from sfd_scale.kernels.fp8_cast import fp8_transpose

    # 200 x 130: partial tiles on both axes; every byte value, NaN and the saturated ones too.
    x8 = torch.arange(200 * 130, dtype=torch.int32).remainder(256).to(torch.uint8).view(200, 130).view(fp8_dtype)
    got = fp8_transpose(x8.to(DEVICE))
    assert got.dtype == fp8_dtype and got.shape == (130, 200) and got.is_contiguous()
    assert torch.equal(got.cpu().view(torch.uint8), x8.view(torch.uint8).t())
    with pytest.raises(ValueError, match="one-byte elements"):
        fp8_transpose(torch.zeros(16, 16, device=DEVICE))


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", FP8_SHAPES)
def test_fp8_swiglu_backward_cast_kernel(dtype, shape):
    from sfd_scale.kernels.fp8_cast import fp8_swiglu_backward_cast
    from sfd_scale.kernels.reference import fp8_swiglu_backward_cast_reference, swiglu_backward_reference

    # h (rows, 2 x hidden): the gate and value halves at their offsets.
    rows, hidden = shape
    g = torch.Generator().manual_seed(0)
    h = (torch.randn(rows, 2 * hidden, generator=g) * 3).to(DEVICE, dtype)
    dg = torch.randn(rows, hidden, generator=g).to(DEVICE, dtype)
    fp8 = torch.float8_e5m2
    scale = torch.tensor(torch.finfo(fp8).max / 40.0, device=DEVICE)
    slots = torch.full((2,), -1.0, device=DEVICE)
    got = fp8_swiglu_backward_cast(h, dg, scale, fp8, slots[0:1], dtype)
    want = fp8_swiglu_backward_cast_reference(h, dg, scale, fp8, slots[1:2], dtype)
    for name, k, r in zip(("cast", "transposed"), got[:2], want[:2]):
        assert k.dtype == fp8 and k.shape == r.shape, name
        # exp in Triton and in PyTorch may differ in the last bit, and so move a value across an
        # FP8 rounding boundary: a few elements may be one FP8 step apart, no more.
        differ = k.view(torch.uint8) != r.view(torch.uint8)
        assert differ.float().mean() < 0.01, name
        assert ((k.view(torch.uint8).int() - r.view(torch.uint8).int()).abs() <= 1).all(), name
    assert torch.equal(got[1].float(), got[0].float().t())
    dh = swiglu_backward_reference(h, dg)
    torch.testing.assert_close(slots, dh.abs().amax().expand(2), rtol=1e-6, atol=0)
    assert got[2].dtype == dtype
    torch.testing.assert_close(got[2].float(), dh.sum(0), rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-3)
    with pytest.raises(ValueError, match=r"h \(rows, 2H\) and dg \(rows, H\)"):
        fp8_swiglu_backward_cast(h, dg[:, 1:], scale, fp8, slots[0:1], None)


@needs_triton
@pytest.mark.parametrize("tile", [(64, 64, 4), (128, 32, 8), (32, 128, 4), (64, 32, 8, 3, 2)])
def test_swiglu_gradient_cast_on_other_tiles_is_the_same_cast(tile):
    # launchers/bench_fp8_kernels.py times other tiles of this kernel: each must compute the same
    # cast, the same amax and (up to the order partial sums are added in) the same column sums.
    from sfd_scale.kernels.fp8_cast_kernel import SWIGLU_BACKWARD_TILE, swiglu_backward_cast

    g = torch.Generator().manual_seed(0)
    h = (torch.randn(200, 300, generator=g) * 3).to(DEVICE, torch.bfloat16)   # partial tiles both ways
    dg = torch.randn(200, 150, generator=g).to(DEVICE, torch.bfloat16)
    scale = torch.tensor(torch.finfo(torch.float8_e5m2).max / 40.0, device=DEVICE)
    slots = torch.full((2,), -1.0, device=DEVICE)
    results = [swiglu_backward_cast(h, dg, scale, torch.float8_e5m2, slots[i:i + 1], torch.float32, t)
               for i, t in enumerate((SWIGLU_BACKWARD_TILE, tile))]
    for want, got in zip(results[0][:2], results[1][:2]):  # the cast, row by row and column by column
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
    assert slots[0] == slots[1] > 0
    torch.testing.assert_close(results[1][2], results[0][2], rtol=1e-5, atol=1e-4)


@needs_triton
@pytest.mark.parametrize("tile", [(64, 64, 4, 3, 1), (32, 64, 4, 2, 2)])
def test_fp8_casts_whose_programs_loop_down_the_rows_are_the_same_casts(tile):
    # Programs that cast several row blocks each (Tile.row_blocks, the loop pipelined over
    # Tile.stages): the same bytes and amax, and up to the order of additions the same column sums.
    from sfd_scale.kernels.fp8_cast_kernel import CAST_TILE, cast_transpose, swiglu_cast

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(200, 130, generator=g) * 3).to(DEVICE, torch.bfloat16)  # a partial last loop
    h = (torch.randn(200, 260, generator=g) * 3).to(DEVICE, torch.bfloat16)
    scale = torch.tensor(torch.finfo(torch.float8_e5m2).max / 40.0, device=DEVICE)
    for cast in (lambda slot, t: cast_transpose(x, scale, torch.float8_e5m2, slot, torch.float32, t),
                 lambda slot, t: swiglu_cast(h, scale, torch.float8_e5m2, slot, t)):
        slots = torch.full((2,), -1.0, device=DEVICE)
        want, got = (cast(slots[i:i + 1], t) for i, t in enumerate((CAST_TILE, tile)))
        for w, k in zip(want[:2], got[:2]):
            assert torch.equal(k.view(torch.uint8), w.view(torch.uint8))
        assert slots[0] == slots[1] > 0
        if len(got) == 3:
            torch.testing.assert_close(got[2], want[2], rtol=1e-5, atol=1e-4)


@needs_triton
def test_fp8_layer_backward_through_the_kernel_equals_the_twin():
    from sfd_scale.kernels.fp8_cast import fp8_cast_transpose
    from sfd_scale.models.fp8_delayed import Float8DelayedLinear, register_fold_hook

    torch.manual_seed(0)
    plain = torch.nn.Linear(64, 96).to(DEVICE)
    layers = [Float8DelayedLinear.from_linear(copy.deepcopy(plain)) for _ in range(2)]
    for layer in layers:
        register_fold_hook(layer)
    layers[1].cast_transpose = fp8_cast_transpose
    grads = _fp8_layer_grads(layers, torch.randn(2, 40, 64, device=DEVICE), width=96)
    (dx, dw, db, history), (dx_k, dw_k, db_k, history_k) = grads
    assert torch.equal(dx_k, dx) and torch.equal(dw_k, dw) and torch.equal(history_k, history)
    torch.testing.assert_close(db_k, db, rtol=1e-6, atol=1e-5)


@needs_triton
def test_fp8_swiglu_through_the_kernels_is_close_to_the_twins():
    from sfd_scale.kernels import fp8_cast, reference
    from sfd_scale.models.fp8_delayed import Float8DelayedLinear, Float8DelayedSwiGLU, register_fold_hook
    from sfd_scale.models.layers import SwiGLU

    torch.manual_seed(0)
    plain = SwiGLU(64, 48).to(DEVICE)
    mlps = []
    for ops in ((reference.fp8_swiglu_cast_reference, reference.fp8_swiglu_backward_cast_reference),
                (fp8_cast.fp8_swiglu_cast, fp8_cast.fp8_swiglu_backward_cast)):
        twin = copy.deepcopy(plain)
        mlp = Float8DelayedSwiGLU(Float8DelayedLinear.from_linear(twin.w12), Float8DelayedLinear.from_linear(twin.w3),
                                  *ops)
        register_fold_hook(mlp)
        mlps.append(mlp)
    x = torch.randn(2, 40, 64, device=DEVICE)
    results = []
    for mlp in mlps:
        for _ in range(2):  # the first step scales dynamically, the second from the histories
            xi = x.clone().requires_grad_()
            mlp.zero_grad()
            out = mlp(xi)
            (out.float() * torch.linspace(-1, 1, 64, device=DEVICE)).sum().backward()
        results.append((out, xi.grad, *(p.grad for p in mlp.parameters())))
    for got, want in zip(results[1], results[0]):  # exp's last bit may move a value by one FP8 step
        torch.testing.assert_close(got, want, rtol=0.02, atol=2e-3)


@needs_triton
def test_the_start_up_check_finds_the_fp8_kernels_equal_to_their_twins_here():
    # What `model.fp8: delayed` runs before it trusts the kernels on a device (on a GPU: the very
    # binaries a step launches).
    from sfd_scale.kernels.fp8_check import fp8_kernel_failures

    assert fp8_kernel_failures(torch.device(DEVICE)) == []


@needs_triton
def test_the_start_up_check_names_a_kernel_that_writes_wrong_bytes_or_fails(monkeypatch):
    # As on the H100 on 2026-11-27: the SwiGLU cast's first 64 rows wrong, the rest right; and a
    # kernel that does not compile for the device.
    from sfd_scale.kernels import fp8_cast_kernel, fp8_check

    right = fp8_cast_kernel.swiglu_cast

    def first_row_block_wrong(*args):
        cast, cast_t = right(*args)
        wrong = cast.view(torch.uint8)[:64] ^ 0x21
        cast.view(torch.uint8)[:64] = wrong
        return cast, cast_t

    def does_not_compile(*args):
        raise RuntimeError("PTX .version 9.4 does not support .target sm_120")

    monkeypatch.setattr(fp8_cast_kernel, "swiglu_cast", first_row_block_wrong)
    monkeypatch.setattr(fp8_cast_kernel, "transpose", does_not_compile)
    monkeypatch.setattr(fp8_check, "INPUT_DTYPES", (torch.bfloat16,))
    failures = fp8_check.fp8_kernel_failures(torch.device(DEVICE))
    assert len(failures) == 2 and failures[0].startswith("fp8_swiglu_cast(bfloat16 128x128 -> torch.float8_e4m3fn)")
    # Half the bytes, and on a GPU a few more (exp's last bit may move a value across a rounding edge).
    assert re.search(r"cast: 50\.\d% of the bytes differ \(allowed 1%\)", failures[0])
    assert "transposed" not in failures[0]
    assert failures[1] == ("fp8_transpose(128x128): raised RuntimeError: "
                           "PTX .version 9.4 does not support .target sm_120")


@needs_triton
@pytest.mark.parametrize("failures", [(), ("fp8_swiglu_cast(...): cast: 48.0% of the bytes differ",)])
def test_delayed_fp8_casts_with_the_kernels_only_where_they_passed_the_check(monkeypatch, caplog, failures):
    from sfd_scale.kernels import fp8_cast, reference
    from sfd_scale.models import fast_paths
    from sfd_scale.models.fp8_delayed import Float8DelayedLinear, Float8DelayedSwiGLU
    from sfd_scale.models.lightningdit import LightningDiTBlock

    monkeypatch.setattr(fast_paths, "fp8_kernel_failures", lambda device, tiles: failures)
    model = torch.nn.Module()
    model.blocks = torch.nn.ModuleList([LightningDiTBlock(96, 2, 4.0, "sdpa")])  # every linear FP8-sized
    with caplog.at_level("WARNING", logger=fast_paths.log.name):
        assert fast_paths.apply_fp8(model, "delayed", torch.device(DEVICE)) == 4
    linears = [m for m in model.modules() if isinstance(m, Float8DelayedLinear)]
    (mlp,) = [m for m in model.modules() if isinstance(m, Float8DelayedSwiGLU)]
    if failures:
        assert all(m.cast_transpose is reference.fp8_cast_transpose_reference for m in linears)
        assert mlp.swiglu_cast is reference.fp8_swiglu_cast_reference
        assert "disagree with their PyTorch twins" in caplog.text and failures[0] in caplog.text
        # Figures and loss curves name the casts they ran with (sfd_scale/bench.py, precision_curve.py).
        assert model.fp8_casts == f"pytorch (the start-up check failed: {failures[0]})"
    else:
        assert all(m.cast_transpose is fp8_cast.fp8_cast_transpose for m in linears)
        assert mlp.swiglu_cast is fp8_cast.fp8_swiglu_cast and not caplog.records
        assert model.fp8_casts == "triton"


@needs_triton
def test_fp8_tiles_from_the_environment_drive_the_ops_and_are_named(monkeypatch):
    # How a GPU session runs a whole step on the tiles launchers/bench_fp8_kernels.py found fastest.
    from sfd_scale.kernels import fp8_cast, fp8_cast_kernel, reference
    from sfd_scale.kernels.fp8_cast_kernel import TILES_ENV, Tile
    from sfd_scale.models import fast_paths
    from sfd_scale.models.lightningdit import LightningDiTBlock

    launched = []
    launch = fp8_cast_kernel._launch
    monkeypatch.setattr(fp8_cast_kernel, "_launch", lambda *args: launched.append(args[7]) or launch(*args))
    monkeypatch.setenv(TILES_ENV, "swiglu_backward_cast=64x64x8x2x2, cast_transpose=32x64x4")
    g = torch.Generator().manual_seed(0)
    x, h, dg = (torch.randn(*shape, generator=g).to(DEVICE) for shape in ((96, 64), (96, 128), (96, 64)))
    scale, slots = torch.tensor(4.0, device=DEVICE), torch.zeros(2, device=DEVICE)
    e5m2 = torch.float8_e5m2
    for kernel, twin in ((fp8_cast.fp8_cast_transpose(x, scale, e5m2, slots[:1], None),
                          reference.fp8_cast_transpose_reference(x, scale, e5m2, slots[1:], None)),
                         (fp8_cast.fp8_swiglu_backward_cast(h, dg, scale, e5m2, slots[:1], None),
                          reference.fp8_swiglu_backward_cast_reference(h, dg, scale, e5m2, slots[1:], None))):
        assert torch.equal(kernel[0].view(torch.uint8), twin[0].view(torch.uint8))
    fp8_cast.fp8_swiglu_cast(h, scale, torch.float8_e4m3fn, slots[:1])
    assert launched == [Tile(32, 64, 4), Tile(64, 64, 8, 2, 2), fp8_cast_kernel.CAST_TILE]
    monkeypatch.setattr(fast_paths, "fp8_kernel_failures", lambda device, tiles: ())
    model = torch.nn.Module()
    model.blocks = torch.nn.ModuleList([LightningDiTBlock(96, 2, 4.0, "sdpa")])
    fast_paths.apply_fp8(model, "delayed", torch.device(DEVICE))
    assert model.fp8_casts == f"triton ({TILES_ENV} cast_transpose=32x64x4,swiglu_backward_cast=64x64x8x2x2)"
    # A mistyped override stops the run by name, rather than passing for a kernel that failed its check.
    monkeypatch.setenv(TILES_ENV, "swiglu_backward=64x64x8")
    with pytest.raises(ValueError, match=f"{TILES_ENV}: 'swiglu_backward=64x64x8' is not OP="):
        fast_paths.apply_fp8(model, "delayed", torch.device(DEVICE))


@needs_triton
@pytest.mark.parametrize("spec", ["cast_transpose=64x64", "cast_transpose=48x64x4", "cast_transpose=64x64x4x0x1",
                                  "swiglu_cast=64xax4", "swiglu_cast", "rope=64x64x4"])
def test_fp8_tile_overrides_refuse_what_is_not_a_tile(spec):
    from sfd_scale.kernels.fp8_cast_kernel import Tile, parse_tiles, tile_name

    with pytest.raises(ValueError, match="SFD_FP8_TILES: .* is not OP=ROWSxCOLSxWARPS"):
        parse_tiles(spec)
    tiles = {"cast_transpose": Tile(64, 64, 8), "swiglu_backward_cast": Tile(64, 32, 8, 4, 3)}
    assert parse_tiles(",".join(f"{op}={tile_name(tile)}" for op, tile in tiles.items())) == tiles  # round trip


@needs_triton
@pytest.mark.parametrize("shape", FP8_SHAPES)
def test_fp8_swiglu_cast_kernel(shape):
    from sfd_scale.kernels.fp8_cast import fp8_swiglu_cast
    from sfd_scale.kernels.reference import fp8_swiglu_cast_reference, swiglu_reference

    rows, hidden = shape
    g = torch.Generator().manual_seed(0)
    h = (torch.randn(rows, 2 * hidden, generator=g) * 3).to(DEVICE, torch.bfloat16)
    fp8 = torch.float8_e4m3fn
    scale = torch.tensor(torch.finfo(fp8).max / 20.0, device=DEVICE)
    slots = torch.full((2,), -1.0, device=DEVICE)
    got = fp8_swiglu_cast(h, scale, fp8, slots[0:1])
    want = fp8_swiglu_cast_reference(h, scale, fp8, slots[1:2])
    for name, k, r in zip(("cast", "transposed"), got, want):
        assert k.dtype == fp8 and k.shape == r.shape, name
        differ = k.view(torch.uint8) != r.view(torch.uint8)  # exp's last bit, across a rounding boundary
        assert differ.float().mean() < 0.01, name
        assert ((k.view(torch.uint8).int() - r.view(torch.uint8).int()).abs() <= 1).all(), name
    assert got[0].shape == (rows, hidden) and torch.equal(got[1].float(), got[0].float().t())
    torch.testing.assert_close(slots, swiglu_reference(h.float()).abs().amax().expand(2), rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match=r"h \(rows, 2H\)"):
        fp8_swiglu_cast(h[:, 1:], scale, fp8, slots[0:1])


def _fp8_layer_grads(layers, x: torch.Tensor, width: int) -> list[tuple[torch.Tensor, ...]]:
    """(dx, dW, db, gradient amax history) of each FP8 layer after its second step (the first
    scales dynamically, the second from the history)."""
    grads = []
    for layer in layers:
        for _ in range(2):
            xi = x.clone().requires_grad_()
            layer.zero_grad()
            (layer(xi).float() * torch.linspace(-1, 1, width, device=DEVICE)).sum().backward()
        grads.append((xi.grad, layer.weight.grad, layer.bias.grad, layer.fp8_grad_amax_history.clone()))
    return grads


TILE_SIGNATURE = {"BLOCK_ROWS": "constexpr", "BLOCK_COLS": "constexpr", "ROW_BLOCKS": "constexpr",
                  "STAGES": "constexpr"}


def _tile_constexprs(tile) -> dict[str, int]:
    return {"BLOCK_ROWS": tile.rows, "BLOCK_COLS": tile.cols, "ROW_BLOCKS": tile.row_blocks, "STAGES": tile.stages}


def _float_min_max(ptx: str) -> list[str]:
    """The float min/max instructions in `ptx`. The FP8 kernels must hold none: with a
    NaN-propagating one in the kernel, Triton can miscompile a transposed FP8 store on Hopper
    (triton-lang/triton#11111; these kernels' CUDA tests failed so, docs/benchmarks.md, session 10),
    and only the compare-and-select form is reported clean."""
    return re.findall(r"\b(?:min|max)(?:\.\w+)*\.(?:NaN|f32|f16|bf16)\S*", ptx)


@needs_triton
@pytest.mark.skipif(torch.cuda.is_available(), reason="PTX inspection is the CPU machines' check; a GPU runs the kernel")
def test_fp8_cast_transpose_writes_both_layouts_in_128_bit_stores(monkeypatch):
    # Without a GPU: the sm_90 PTX loads the bf16 tile and stores each FP8 layout 16 bytes at a
    # time (the transposed one staged through shared memory), rounding with the hardware's
    # saturating round-to-nearest conversion (as torch's FP8 cast rounds).
    from fixtures import hopper_ptx
    from sfd_scale.kernels import fp8_cast_kernel

    signature = {"x_ptr": "*bf16", "scale_ptr": "*fp32", "out_ptr": "*fp8e5", "out_t_ptr": "*fp8e5",
                 "amax_part_ptr": "*fp32", "colsum_part_ptr": "*fp32", "rows": "i32", "cols": "i32",
                 "COLUMN_SUMS": "constexpr", **TILE_SIGNATURE}
    aligned = {(i,): [["tt.divisibility", 16]] for i in (0, 2, 3, 5, 6, 7)}  # pointers, rows, cols
    tile = fp8_cast_kernel.CAST_TILE
    ptx = hopper_ptx(monkeypatch, fp8_cast_kernel, "_cast_transpose_kernel", signature,
                     {"COLUMN_SUMS": True, **_tile_constexprs(tile)}, attrs=aligned,
                     helpers=("_magnitude_bits", "_amax", "_MAX", "_SUM"),
                     warps=tile.warps)
    assert ptx.count("ld.global.v4.b32") == 4 and ptx.count("st.global.v4.b32") == 4  # 64 B in, 2 x 32 B out
    assert "cvt.rn.satfinite.e5m2x2.f32" in ptx and "st.global.b8" not in ptx
    assert not _float_min_max(ptx)


@needs_triton
@pytest.mark.skipif(torch.cuda.is_available(), reason="PTX inspection is the CPU machines' check; a GPU runs the kernel")
@pytest.mark.parametrize("kernel", ["_swiglu_cast_kernel", "_swiglu_backward_cast_kernel"])
def test_fp8_swiglu_kernels_compile_for_hopper_with_wide_accesses(monkeypatch, kernel):
    # As launched on aligned bf16 h (and output gradient), with the launch's warps: h's gate and
    # value halves load in 128-bit accesses and the FP8 tiles leave in vectors, saturated and
    # rounded by the hardware's conversion (the activation to e4m3, its gradient to e5m2).
    from fixtures import hopper_ptx
    from sfd_scale.kernels import fp8_cast_kernel

    forward = kernel == "_swiglu_cast_kernel"
    inputs = {"h_ptr": "*bf16"} if forward else {"h_ptr": "*bf16", "dg_ptr": "*bf16"}
    partials = {"amax_part_ptr": "*fp32"} if forward else {"amax_part_ptr": "*fp32", "colsum_part_ptr": "*fp32"}
    fp8, conversion = ("*fp8e4nv", "cvt.rn.satfinite.e4m3x2.f32") if forward else ("*fp8e5", "cvt.rn.satfinite.e5m2x2.f32")
    signature = {**inputs, "scale_ptr": "*fp32", "out_ptr": fp8, "out_t_ptr": fp8, **partials,
                 "rows": "i32", "hidden": "i32", **TILE_SIGNATURE}
    tile, constexprs = fp8_cast_kernel.CAST_TILE, {}
    if not forward:  # as launched: its own narrower tile
        signature = {**{k: v for k, v in signature.items() if k not in TILE_SIGNATURE}, "COLUMN_SUMS": "constexpr",
                     **TILE_SIGNATURE}
        tile, constexprs = fp8_cast_kernel.SWIGLU_BACKWARD_TILE, {"COLUMN_SUMS": True}
    pointers_and_sizes = [i for i, (name, kind) in enumerate(signature.items())
                          if kind.startswith("*") and name != "scale_ptr" or name in ("rows", "hidden")]
    ptx = hopper_ptx(monkeypatch, fp8_cast_kernel, kernel, signature, {**constexprs, **_tile_constexprs(tile)},
                     attrs={(i,): [["tt.divisibility", 16]] for i in pointers_and_sizes},
                     helpers=("_magnitude_bits", "_amax", "_MAX", "_SUM"), warps=tile.warps)
    # A thread's share of an FP8 tile, up to 16 bytes, leaves in one vector store: the launched
    # SwiGLU-gradient tile (64 x 32, 8 warps) gives 8 bytes a thread (bench_fp8_kernels.py times
    # 64 x 64 with 8 warps, 16 bytes, against it).
    store = {16: "st.global.v4.b32", 8: "st.global.v2.b32"}[min(tile.rows * tile.cols // (32 * tile.warps), 16)]
    assert "ld.global.v4.b32" in ptx and store in ptx
    assert conversion in ptx and "st.global.b8" not in ptx
    assert not _float_min_max(ptx)


@needs_triton
@pytest.mark.skipif(torch.cuda.is_available(), reason="PTX inspection is the CPU machines' check; a GPU runs the kernel")
def test_fp8_transpose_kernel_reads_and_writes_128_bit_accesses(monkeypatch):
    # As launched on aligned matrices: whole 16-byte vectors each way (the transposed side staged
    # through shared memory), never byte by byte.
    from fixtures import hopper_ptx
    from sfd_scale.kernels import fp8_cast_kernel

    signature = {"x_ptr": "*u8", "out_ptr": "*u8", "rows": "i32", "cols": "i32",
                 "BLOCK_ROWS": "constexpr", "BLOCK_COLS": "constexpr"}
    ptx = hopper_ptx(monkeypatch, fp8_cast_kernel, "_transpose_kernel", signature,
                     {"BLOCK_ROWS": fp8_cast_kernel._TRANSPOSE_BLOCK, "BLOCK_COLS": fp8_cast_kernel._TRANSPOSE_BLOCK},
                     attrs={(i,): [["tt.divisibility", 16]] for i in range(4)})
    assert "ld.global.v4.b32" in ptx and "st.global.v4.b32" in ptx
    assert "st.global.b8" not in ptx and "ld.global.b8" not in ptx


@needs_triton
@pytest.mark.skipif(torch.cuda.is_available(), reason="PTX inspection is the CPU machines' check; a GPU runs the kernel")
def test_fp8_cast_finish_kernel_compiles_for_hopper_and_writes_bf16_sums(monkeypatch):
    # The interpreter runs the partials' reduction; this compiles it as a GPU would (its loops
    # over a runtime count, the max of magnitudes, the infinity test) and checks the sums leave
    # in bf16, rounded to nearest.
    from fixtures import hopper_ptx
    from sfd_scale.kernels import fp8_cast_kernel

    signature = {"amax_part_ptr": "*fp32", "parts": "i32", "amax_out_ptr": "*fp32", "colsum_part_ptr": "*fp32",
                 "sums_ptr": "*bf16", "row_blocks": "i32", "cols": "i32", "COLUMN_SUMS": "constexpr",
                 "AMAX_BLOCK": "constexpr", "SUM_ROWS": "constexpr", "SUM_COLS": "constexpr"}
    # As launched after the XXL qkv gradient's cast: 128 x 72 partials, 4,608 column sums.
    tiles = fp8_cast_kernel._finish_tiles(128 * 72, 128)
    assert tiles == {"AMAX_BLOCK": 16384, "SUM_ROWS": 128, "SUM_COLS": 64}  # every partial in one load
    aligned = {(i,): [["tt.divisibility", 16]] for i in range(7)}  # pointers and counts, as at XXL's sizes
    ptx = hopper_ptx(monkeypatch, fp8_cast_kernel, "_finish_kernel", signature, {"COLUMN_SUMS": True, **tiles},
                     attrs=aligned, helpers=("_MAX", "_SUM"))
    assert not _float_min_max(ptx) and "selp" in ptx and "cvt.rn.bf16" in ptx
    assert "ld.global.v4.b32" in ptx and "ld.global.b32" not in ptx  # 16-byte loads of the partials


@needs_triton
@pytest.mark.skipif(torch.cuda.is_available(), reason="PTX inspection is the CPU machines' check; a GPU runs the kernel")
def test_rope_kernel_moves_whole_rows_in_128_bit_accesses(monkeypatch):
    """The kernel compiled for sm_90 as a launch on aligned bf16 tensors with head_dim 64 would
    specialise it (Triton emits PTX without a GPU): no 2-byte loads of every other element."""
    from fixtures import hopper_ptx
    from sfd_scale.kernels import rope

    signature = {"x_ptr": "*bf16", "cos_ptr": "*fp32", "sin_ptr": "*fp32", "out_ptr": "*bf16", "rows": "i32",
                 "tokens": "i32", "head_dim": "i32", "INVERSE": "constexpr", "ROWS": "constexpr", "BLOCK_D": "constexpr"}
    aligned = {(i,): [["tt.divisibility", 16]] for i in (0, 1, 2, 3, 5, 6)}  # pointers, tokens, head_dim
    ptx = hopper_ptx(monkeypatch, rope, "_rotate_kernel", signature,
                     {"INVERSE": False, "ROWS": rope._ROWS, "BLOCK_D": 64}, attrs=aligned, helpers=("_pairs",))
    assert ptx.count("ld.global.v4.b32") >= 3 and ptx.count("st.global.v4.b32") >= 1  # x, cos, sin; out
    assert "ld.global.b16" not in ptx and "st.global.b16" not in ptx
