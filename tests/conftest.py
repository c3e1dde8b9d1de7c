"""Test set-up: run Triton kernels through the interpreter when there is no GPU.

TRITON_INTERPRET must be set before triton is first imported, so this runs before torch.
"""
import os
import shutil

if not os.environ.get("CUDA_VISIBLE_DEVICES") and shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu") is not None and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _triton_on_cpu_needs_interpreter(request):
    """The triton backend serves CPU tensors only through the interpreter: on a GPU machine (no
    TRITON_INTERPRET) tests parametrized with backend="triton" on device "cpu" (the default) are
    skipped and their cuda twins run."""
    params = getattr(getattr(request.node, "callspec", None), "params", {})
    if params.get("backend") == "triton" and params.get("device", "cpu") == "cpu" and not INTERPRET:
        pytest.skip("triton backend on CPU tensors needs TRITON_INTERPRET=1")


# ----------------------------------------------------------------------------- program order
# The interpreter runs a grid's programs one after another, in order: a kernel that relies on program
# order (one program reading what a lower-numbered one wrote) passes on CPU and races on a GPU. A test
# that uses the ``program_order`` fixture (``pytestmark = pytest.mark.usefixtures("program_order")``)
# runs twice: programs in order, and in reverse (every grid index mirrored). A parametrized fixture,
# not a collection hook, so that it composes with any other hook of this file.
@pytest.fixture(params=["in_order", "reversed"])
def program_order(request, monkeypatch):
    if request.param == "reversed" and INTERPRET:
        from triton.runtime.interpreter import interpreter_builder as builder

        set_grid_idx = builder.set_grid_idx

        def mirrored(x, y, z):
            nx, ny, nz = builder.grid_dim
            set_grid_idx(nx - 1 - x, ny - 1 - y, nz - 1 - z)

        monkeypatch.setattr(builder, "set_grid_idx", mirrored)
    return request.param
