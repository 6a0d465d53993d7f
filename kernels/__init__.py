"""Triton kernels with plain-PyTorch references; installed as `sfd_scale.kernels`.

Triton is optional: this package imports without it, and so do `reference` (the plain-PyTorch
twins) and `fp8_cast` (a custom op). The kernel modules (`rmsnorm_modulate`, `swiglu`, `rope`,
`fp8_cast_kernel`) import Triton and are loaded only once it is decided that they can run: on a
CUDA device, or on the CPU under Triton's interpreter (`TRITON_INTERPRET=1`, set before the modules
are imported). `sfd_scale.models.fast_paths` decides for the first three; the `fp8_cast` op
imports its kernel the first time it runs on such a device.

Kernels here call Triton builtins only (`tl.load`, `tl.exp`, `tl.reduce`, ...), never the helpers
of `triton.language.standard` (`tl.sum`, `tl.zeros`, `tl.sigmoid`, ...): those are themselves
`@triton.jit` functions, fixed as compiled or interpreted when `triton` is first imported (which
torch does early, e.g. for its FLOP counter), so the interpreter could not run them in a process
that imported Triton before setting the variable. Two of them may be handed to `tl.reduce` as its
combine function (`fp8_cast_kernel`): the interpreter recognises `_elementwise_max` and
`_sum_combine` and reduces with numpy without calling them.
"""
from __future__ import annotations

import importlib.util
import os


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreting() -> bool:
    """Whether Triton kernels defined from now on run in its (slow, CPU) interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
