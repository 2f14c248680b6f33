"""The shared check of linear assignment results against scipy (reference.linear_assignment)."""
import torch

from mcsmoe_fast import reference


def check_optimal(cost: torch.Tensor, cols: torch.Tensor, maximize: bool, rtol: float = 1e-9):
    """cols (on the cost's device) is a valid assignment whose objective equals scipy's."""
    assert cols.device == cost.device
    costs = (cost if cost.dim() == 3 else cost.unsqueeze(0)).cpu()
    cols_b = (cols if cols.dim() == 2 else cols.unsqueeze(0)).cpu()
    assert cols_b.dtype == torch.int64 and cols_b.shape == costs.shape[:2]
    for c, a in zip(costs, cols_b):
        assert (a >= 0).all() and (a < c.shape[1]).all(), a
        assert a.unique().numel() == a.numel(), "a column was used twice"
    ours = reference.assignment_objective(costs, cols_b)
    theirs = reference.assignment_objective(costs, reference.linear_assignment(costs, maximize))
    scale = costs.double().abs().flatten(1).max(1).values.clamp_min(1e-300) * costs.shape[2]
    assert torch.all((ours - theirs).abs() <= rtol * torch.maximum(theirs.abs(), scale)), (ours, theirs)
