"""Test set-up: the Triton interpreter where there is no GPU, and the ``backend`` parameter.

TRITON_INTERPRET must be set before triton is first imported; torch does not import triton, so
asking torch whether there is a GPU comes first.

Every test that takes a ``backend`` (or ``op_backend``) argument and does not parametrize it itself
runs once per backend of fusedstab's registry that this process has (``fusedstab.available_backends()``),
so a new backend is tested by every op test without editing them. A case whose backend cannot serve its
device is skipped with the registry's reason; with FUSEDSTAB_REQUIRE_EXT=1 (CI) a ``cpu`` backend
that failed to build fails instead of hiding behind skips.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from fusedstab import backend as fs_backend  # noqa: E402
from helpers import test_backends  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
REQUIRE_EXT = os.environ.get("FUSEDSTAB_REQUIRE_EXT") == "1"


def _parametrizes_backend(metafunc) -> bool:
    for mark in metafunc.definition.iter_markers("parametrize"):
        names = mark.args[0]
        names = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
        if "backend" in names:
            return True
    return False


def pytest_generate_tests(metafunc):
    if "backend" in metafunc.fixturenames and not _parametrizes_backend(metafunc):
        metafunc.parametrize("backend", test_backends(), indirect=True)
    if "op_backend" in metafunc.fixturenames:
        metafunc.parametrize("op_backend", test_backends(), indirect=True)


@pytest.fixture
def backend(request):
    """The backend name (test files that run their body under it define their own ``backend``)."""
    return request.param


@pytest.fixture
def op_backend(request):
    """The test body runs under ``fusedstab.use_backend(<each backend>)``."""
    with fs_backend.use_backend(request.param):
        yield request.param


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu") is not None and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _grad_mode():
    """Grad mode as the test found it. A torch.compile'd @torch.no_grad() function that raises inside
    its graph under a plain backend (CompileCounter runs the FX graph itself) never runs the graph's
    set_grad_enabled(True): one failing test then took autograd away from thousands after it."""
    enabled = torch.is_grad_enabled()
    yield
    torch.set_grad_enabled(enabled)


@pytest.fixture(autouse=True)
def _backend_serves_device(request):
    """Skip a case whose backend cannot serve its device here (triton on CPU tensors without the
    interpreter, cpu on CUDA tensors, ...), with the registry's reason."""
    params = getattr(getattr(request.node, "callspec", None), "params", {})
    name = params.get("backend", params.get("op_backend"))
    if name is None:
        return
    # the case's device parameter, else the module's device (DEV: the GPU where there is one)
    device = str(params.get("device", getattr(request.module, "DEV", "cpu"))).split(":")[0]
    why = fs_backend.unavailable(name, device)
    if why is not None:
        if name == "cpu" and device == "cpu" and REQUIRE_EXT:
            pytest.fail(f"FUSEDSTAB_REQUIRE_EXT=1 but the cpu backend is unavailable: {why}")
        pytest.skip(why)


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


def _require_ext(why, what: str) -> None:
    """Skip where ``what`` is unavailable (``why``); under FUSEDSTAB_REQUIRE_EXT=1 (CI, which must build
    the extension) fail instead."""
    if why is not None:
        if os.environ.get("FUSEDSTAB_REQUIRE_EXT") == "1":
            pytest.fail(f"FUSEDSTAB_REQUIRE_EXT=1 but {what} is not available: {why}")
        pytest.skip(f"{what} is not available: {why}")


@pytest.fixture(scope="session")
def C():
    """torch.ops.fusedstab_C, for the tests that call the C++ kernels directly."""
    from fusedstab import extension

    _require_ext(extension.load(), "the C++ extension")
    return extension.ops()


@pytest.fixture(scope="session")
def cuda_ext():
    """The cuda backend, for the tests of the CUDA kernels (pytest.mark.usefixtures("cuda_ext"))."""
    if not HAS_CUDA:
        pytest.skip("needs a CUDA GPU")
    _require_ext(fs_backend.unavailable("cuda", "cuda"), "the cuda backend")
