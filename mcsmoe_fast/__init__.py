"""mcsmoe-fast: Merge, Then Compress (MC-SMoE) for Mixture-of-Experts models, with fused kernels."""
__version__ = "0.1.0"

from ._requirements import check_torch as _check_torch, check_transformers as _check_transformers  # noqa: E402

_check_torch()
_check_transformers()
from . import ops  # noqa: E402  (loads the native extension; raises with build instructions if missing)
from .calibrate import collect_routing_stats  # noqa: E402
from .calibration_data import calibration_batches, load_tokenizer, read_calibration_texts  # noqa: E402
from .checkpoint import from_pretrained, save_pretrained  # noqa: E402
from .compress import compress_experts  # noqa: E402
from .merge import merge_experts  # noqa: E402
from .models import moe_layers  # noqa: E402
from .loading import open_model  # noqa: E402
from .optimize import optimize  # noqa: E402
from .permute import align_experts  # noqa: E402
from .prune import prune_experts  # noqa: E402
from .pruner import CompressionPruner  # noqa: E402
from .ream import ream_experts  # noqa: E402
from .modules.experts_interface import register as _register_experts_implementation  # noqa: E402

_register_experts_implementation()  # experts_implementation="mcsmoe_fast" in transformers

__all__ = [
    "__version__",
    "ops",
    "moe_layers",
    "open_model",
    "load_tokenizer",
    "read_calibration_texts",
    "calibration_batches",
    "align_experts",
    "collect_routing_stats",
    "merge_experts",
    "compress_experts",
    "prune_experts",
    "ream_experts",
    "CompressionPruner",
    "save_pretrained",
    "from_pretrained",
    "optimize",
]
