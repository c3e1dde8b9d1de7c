"""Whether fp32 matmuls may use tf32 (issue 13, item 1): read through torch's new API where it exists.

torch >= 2.9 raises ("mix of the legacy and new APIs") when ``torch.backends.cuda.matmul.allow_tf32``
is read after a user set ``torch.backends.cuda.matmul.fp32_precision`` or ``torch.backends.fp32_precision``.
The Linear + Leaky ReLU kernel read the legacy flag for every fp32 call (CPU included, under the
interpreter), the attention op for every CUDA call whatever its dtype.
"""
from __future__ import annotations

import types

import pytest
import torch

import fusedstab
import fusedstab.functional as FF
from fusedstab.kernels import common
from fusedstab.kernels import linear_leaky_relu as LK
from fusedstab.ops import attention as attention_ops

NEW_API = hasattr(torch.backends.cuda.matmul, "fp32_precision")
needs_new_api = pytest.mark.skipif(not NEW_API, reason="torch < 2.9 has no fp32_precision API")


@pytest.fixture(autouse=True)
def _restore_tf32_flags():
    """Leave torch's flags as found: both APIs back to "none" (unset), the legacy flag to its value."""
    legacy = torch.backends.cuda.matmul.allow_tf32 if not NEW_API or _unset() else False
    yield
    if NEW_API:
        torch.backends.cuda.matmul.fp32_precision = "none"
        torch.backends.fp32_precision = "none"
    torch.backends.cuda.matmul.allow_tf32 = legacy
    if NEW_API:  # setting the legacy flag sets the new one too: unset it again
        torch.backends.cuda.matmul.fp32_precision = "none"


def _unset() -> bool:
    return torch.backends.cuda.matmul.fp32_precision == "none" and torch.backends.fp32_precision == "none"


def _setters():
    return {
        "matmul.fp32_precision": lambda v: setattr(torch.backends.cuda.matmul, "fp32_precision", v),
        "backends.fp32_precision": lambda v: setattr(torch.backends, "fp32_precision", v),
    }


@needs_new_api
@pytest.mark.parametrize("api", ["matmul.fp32_precision", "backends.fp32_precision"])
@pytest.mark.parametrize("value", ["tf32", "ieee"])
def test_new_api_is_read(api, value):
    _setters()[api](value)
    if value == "tf32":
        with pytest.raises(RuntimeError, match="legacy and new"):  # what the old code read
            torch.backends.cuda.matmul.allow_tf32
    assert common.fp32_matmul_allows_tf32() is (value == "tf32")
    assert LK.input_precision(torch.float32) == value
    assert LK.input_precision(torch.bfloat16) is None and LK.input_precision(torch.float16) is None


@pytest.mark.parametrize("allow", [False, True])
def test_legacy_api_is_read(allow):
    torch.backends.cuda.matmul.allow_tf32 = allow
    assert common.fp32_matmul_allows_tf32() is allow
    assert LK.input_precision(torch.float32) == ("tf32" if allow else "ieee")


@needs_new_api
@pytest.mark.parametrize("api", ["matmul.fp32_precision", "backends.fp32_precision"])
def test_linear_leaky_relu_fp32_after_new_api(api):
    """The user-visible crash: F-style linear_leaky_relu in fp32 on the triton backend (the interpreter
    on CPU; on a GPU its tf32 numerics are the GPU tests' concern)."""
    _setters()[api]("tf32")
    x, w, b = torch.randn(5, 16), torch.randn(24, 16), torch.randn(24)
    with fusedstab.use_backend("triton"):
        y = FF.linear_leaky_relu(x, w, b)
    # the interpreter runs tf32 dots in full fp32
    torch.testing.assert_close(y, torch.nn.functional.leaky_relu(x @ w.t() + b, 0.01), rtol=1e-5, atol=1e-5)


@needs_new_api
@pytest.mark.parametrize("api", ["matmul.fp32_precision", "backends.fp32_precision"])
def test_attention_reads_the_flag_for_fp32_cuda_only(api):
    """The attention op's read, on stand-ins for CUDA tensors (only .device and .dtype are read)."""
    _setters()[api]("tf32")
    cuda = torch.device("cuda")
    for dtype in (torch.float16, torch.bfloat16):
        assert attention_ops._allow_tf32(types.SimpleNamespace(device=cuda, dtype=dtype)) is False
    assert attention_ops._allow_tf32(types.SimpleNamespace(device=cuda, dtype=torch.float32)) is True
    assert attention_ops._allow_tf32(torch.zeros(1)) is False  # CPU: the interpreter, no tf32
    _setters()[api]("ieee")
    assert attention_ops._allow_tf32(types.SimpleNamespace(device=cuda, dtype=torch.float32)) is False
