"""Triton kernels against their plain-PyTorch twins, values and gradients in float32 and bfloat16.

Without a GPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1 for this file's tests);
without Triton those tests skip. The twins are checked against the model's own modules first, so
a kernel that equals its twin equals the model.
"""
import pytest
import torch

from sfd_scale.kernels import triton_installed
from sfd_scale.kernels.reference import rmsnorm_modulate_reference, rope_reference, swiglu_reference
from sfd_scale.models.layers import RMSNorm, Rope2D, SwiGLU, modulate
from fixtures import triton_interpreter_without_gpu  # noqa: F401  (autouse, module scope)


needs_triton = pytest.mark.skipif(not triton_installed(), reason="Triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
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
