"""The shared check of linear assignment results against scipy (reference.linear_assignment)."""
import torch

from mcsmoe_fast import reference


def check_optimal(cost: torch.Tensor, cols: torch.Tensor, maximize: bool, rtol: float = 1e-9):
    """cols (on the cost's device) is a valid assignment whose objective equals scipy's: min(n, m) pairs,
    no column twice, -1 only for rows left over when n > m, no forbidden pair (an infinite entry)."""
    assert cols.device == cost.device
    costs = (cost if cost.dim() == 3 else cost.unsqueeze(0)).cpu()
    cols_b = (cols if cols.dim() == 2 else cols.unsqueeze(0)).cpu()
    assert cols_b.dtype == torch.int64 and cols_b.shape == costs.shape[:2]
    n, m = costs.shape[1:]
    for c, a in zip(costs, cols_b):
        assert (a >= -1).all() and (a < m).all(), a
        taken = a[a >= 0]
        assert taken.numel() == min(n, m), f"{taken.numel()} pairs, want {min(n, m)}"
        assert taken.unique().numel() == taken.numel(), "a column was used twice"
    ours = reference.assignment_objective(costs, cols_b)
    assert torch.isfinite(ours).all(), f"a forbidden pair was used: {ours}"
    theirs = reference.assignment_objective(costs, reference.linear_assignment(costs, maximize))
    finite = costs.double().abs().nan_to_num(posinf=0.0)
    scale = finite.flatten(1).amax(1).clamp_min(1e-300) * max(n, m) if costs.numel() else torch.ones(len(costs))
    assert torch.all((ours - theirs).abs() <= rtol * torch.maximum(theirs.abs(), scale)), (ours, theirs)
