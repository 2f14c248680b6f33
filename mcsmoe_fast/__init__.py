"""mcsmoe-fast: Merge, Then Compress (MC-SMoE) for Mixture-of-Experts models, with fused kernels."""
__version__ = "0.1.0"

from . import ops  # noqa: E402  (loads the native extension; raises with build instructions if missing)
from .models import moe_layers  # noqa: E402
from .permute import align_experts  # noqa: E402

__all__ = ["ops", "moe_layers", "align_experts", "__version__"]
