"""fusedstab: fused GPU kernels for the operations that keep training stable."""
from . import ops  # noqa: F401  (registers the torch.ops.fusedstab custom ops)
from . import autograd, functional, nn, reference, utils  # noqa: F401
from .backend import BackendError, available_backends, get_backend, use_backend

__version__ = "0.1.0"
__all__ = ["BackendError", "available_backends", "get_backend", "use_backend",
           "autograd", "functional", "nn", "reference", "utils"]
