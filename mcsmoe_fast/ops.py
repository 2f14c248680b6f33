"""The Python face of every native op: torch.ops.mcsmoe_fast.*, with fake (meta) implementations
so torch.compile can trace them. Plain-PyTorch references of the same ops are in reference.py."""
from __future__ import annotations

import torch

from ._ext import _C  # noqa: F401  (loading it registers the ops)

_lib = torch.ops.mcsmoe_fast


# --- linear assignment ---------------------------------------------------------------------------
def linear_assignment(cost: torch.Tensor, maximize: bool = False) -> torch.Tensor:
    """Optimal assignment of rows to columns for cost [n, m] or a batch [B, n, m] (n <= m).

    Returns int64 column indices [..., n]: row i takes column out[..., i]; the objective is optimal
    (equal to scipy.optimize.linear_sum_assignment's). float32 or float64, CPU or CUDA; duals are
    float64. Raises on n > m, non-finite entries or a wrong rank.
    """
    return _lib.linear_assignment(cost, maximize)


@torch.library.register_fake("mcsmoe_fast::linear_assignment")
def _linear_assignment_fake(cost: torch.Tensor, maximize: bool = False) -> torch.Tensor:
    torch._check(cost.dim() in (2, 3), lambda: f"cost must be [n, m] or [B, n, m], got rank {cost.dim()}")
    torch._check(cost.shape[-2] <= cost.shape[-1], lambda: "need n <= m (rows <= columns)")
    return cost.new_empty(cost.shape[:-1], dtype=torch.int64)
