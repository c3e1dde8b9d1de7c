"""torch.library custom ops in the ``fusedstab`` namespace, one module per op family."""
from . import layer_norm  # noqa: F401  (registers fusedstab::layer_norm_fwd / _bwd)
