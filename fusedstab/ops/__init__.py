"""torch.library custom ops in the ``fusedstab`` namespace, one module per op family."""
from . import layer_norm  # noqa: F401  (fusedstab::layer_norm_fwd / _bwd)
from . import multi_tensor  # noqa: F401  (fusedstab::multi_tensor_norm / _scale_)
from . import bias_leaky_relu  # noqa: F401  (fusedstab::bias_leaky_relu_fwd / _bwd)
from . import linear_leaky_relu  # noqa: F401  (fusedstab::linear_leaky_relu_fwd)
from . import group_norm  # noqa: F401  (fusedstab::group_norm_fwd / _bwd)
from . import batch_norm  # noqa: F401  (fusedstab::batch_norm_stats / _elemt / _bwd_reduce / _bwd_elemt)
from . import attention  # noqa: F401  (fusedstab::attention_fwd / _bwd)
from . import grad_stats  # noqa: F401  (fusedstab::grad_stats, fusedstab::grad_clip_finish)
