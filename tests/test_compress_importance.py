"""One-shot compression's row importance against hand computations: the per-slot input norms that
calibration collects (through the expert_map), the activation score mean_j |S_ij| * ||x_j|| (the norm,
not its square), and ONE global threshold over every matrix's raw row scores (no per-matrix scaling).

The expected kept rows are computed here from the slot weights alone: a float64 SVD residual per slot,
row scores by the formulas above, and a greedy global budget over the entries of all matrices."""
import pytest
import torch

from mcsmoe_fast import collect_routing_stats, compress_experts, merge_experts, moe_layers
from merge_helpers import build, calibration

RANK, KEEP = 2, 0.25


def merged_mixtral(tmp_path):
    """A tiny Mixtral (8 experts, top-2, 2 layers) merged to 4 slots per layer."""
    model = build("mixtral", tmp_path)
    batches = calibration(model)
    merge_experts(model, collect_routing_stats(model, batches, progress=False), 4, globally=False, progress=False)
    return model, batches


def slot_weights(model):
    """[(w_in [S, 2ff, d], w_out [S, d, ff])] per MoE layer, in module order, as float64 copies."""
    return [(layer.module.experts.w_in.detach().double().clone(), layer.module.experts.w_out.detach().double().clone())
            for layer in moe_layers(model)]


@torch.no_grad()
def hand_input_norms(model, batches):
    """Per layer (sum over routed tokens of x^2 [S, d], of h^2 [S, ff]), in float64, with a token counted
    once for every slot that one of its top-k experts maps to (h = silu(gate x) * up x of that slot)."""
    model.eval()
    top_k = model.config.num_experts_per_tok
    layers = moe_layers(model)
    captured = {}
    handles = [layer.module.register_forward_pre_hook(
        lambda mod, args, name=layer.name: captured.__setitem__(name, args[0].detach())) for layer in layers]
    sums = {layer.name: None for layer in layers}
    try:
        for batch in batches:
            model(**batch)
            mask = batch["attention_mask"].bool()
            for layer in layers:
                block = layer.module
                x = captured[layer.name][mask].double()  # [T, d], padding left out
                top = (x @ block.gate.weight.double().T).topk(top_k, dim=-1).indices  # [T, k]
                slots = block.experts.expert_map[top]  # [T, k]
                w_in = block.experts.w_in.double()
                S, F, _ = w_in.shape
                ff = F // 2
                if sums[layer.name] is None:
                    sums[layer.name] = (torch.zeros(S, x.shape[1], dtype=torch.float64),
                                        torch.zeros(S, ff, dtype=torch.float64))
                x_sq, h_sq = sums[layer.name]
                for t in range(x.shape[0]):
                    for s in set(slots[t].tolist()):
                        gate, up = w_in[s, :ff] @ x[t], w_in[s, ff:] @ x[t]
                        h = gate * torch.sigmoid(gate) * up
                        x_sq[s] += x[t] ** 2
                        h_sq[s] += h ** 2
    finally:
        for h in handles:
            h.remove()
    return sums


def hand_kept_rows(weights, norms, rank, keep_ratio):
    """The rows one global threshold keeps, as {(layer, side, slot, row)}, side 0 = w_in, 1 = w_out.
    norms: None (importance="weight") or per layer (||x|| [S, d], ||h|| [S, ff])."""
    rows = []  # (score, entries, key)
    for li, mats in enumerate(weights):
        for side, W in enumerate(mats):
            for s in range(W.shape[0]):
                U, sv, Vh = torch.linalg.svd(W[s], full_matrices=False)
                r = min(rank, *W.shape[1:])
                residual = W[s] - U[:, :r] @ torch.diag(sv[:r]) @ Vh[:r]
                mag = residual.abs()
                if norms is not None:
                    mag = mag * norms[li][side][s]  # |S_ij| * ||x_j||
                for row, score in enumerate(mag.mean(1).tolist()):
                    rows.append((score, W.shape[2], (li, side, s, row)))
    budget = keep_ratio * sum(n for _, n, _ in rows)
    ranked = sorted(rows, key=lambda e: -e[0])
    kept, used = set(), 0
    for i, (score, n, key) in enumerate(ranked):
        if used + n > budget:
            # the test must not hinge on float rounding: the first row left out scores clearly lower
            assert score < ranked[i - 1][0] * (1 - 1e-5), "near-tie at the threshold: change the test data"
            break
        used += n
        kept.add(key)
    return kept


def kept_rows(modules):
    """{(layer, side, slot, row)} of the rows compress_experts kept (finalized modules, module order)."""
    kept = set()
    for li, module in enumerate(modules.values()):
        for side, name in enumerate(("in", "out")):
            idx, offsets = getattr(module, f"{name}_row_idx"), getattr(module, f"{name}_row_offsets")
            for s in range(module.num_slots):
                kept.update((li, side, s, int(r)) for r in idx[offsets[s]:offsets[s + 1]])
    return kept


def describe(kept):
    """Kept rows per (layer, side, slot), for failure messages."""
    counts = {}
    for li, side, s, _ in kept:
        counts[(li, side, s)] = counts.get((li, side, s), 0) + 1
    return dict(sorted(counts.items()))


# --- statistics ---------------------------------------------------------------------------------
def test_input_norms_are_summed_per_slot_through_the_expert_map(tmp_path):
    model, batches = merged_mixtral(tmp_path)
    maps = [layer.expert_map().tolist() for layer in moe_layers(model)]
    assert all(m != list(range(len(m))) for m in maps), "the test needs merged layers (expert id != slot)"
    stats = collect_routing_stats(model, batches, progress=False, input_norms=True)
    expected = hand_input_norms(model, batches)
    for layer in moe_layers(model):
        s, (x_sq, h_sq) = stats[layer.name], expected[layer.name]
        assert s.slot_input_sq.shape == x_sq.shape and s.slot_hidden_sq.shape == h_sq.shape
        torch.testing.assert_close(s.slot_input_sq.double(), x_sq, rtol=1e-4, atol=1e-8,
                                   msg=lambda m: f"{layer.name} sum of x^2 per slot: {m}")
        torch.testing.assert_close(s.slot_hidden_sq.double(), h_sq, rtol=1e-4, atol=1e-8,
                                   msg=lambda m: f"{layer.name} sum of h^2 per slot: {m}")


# --- activation importance ------------------------------------------------------------------------
def test_activation_importance_weighs_rows_by_the_input_norm_not_its_square(tmp_path):
    """In every layer one slot (the one with the largest weights, which keeps the most rows) gets 10x its
    weights (so 10x its residual) and inputs of norm 0.1, the other slots inputs of norm 1: with
    |S_ij| * ||x_j|| it competes as before the scaling and keeps rows; with ||x_j||^2 it would score 10x
    lower and lose every row."""
    model, batches = merged_mixtral(tmp_path)
    scaled = []
    with torch.no_grad():
        for layer in moe_layers(model):
            experts = layer.module.experts
            slot = int(experts.w_in.abs().mean((1, 2)).argmax())
            experts.w_in[slot] *= 10
            experts.w_out[slot] *= 10
            scaled.append(slot)
    stats = collect_routing_stats(model, batches, progress=False, input_norms=True)
    norms = []
    for layer, slot in zip(moe_layers(model), scaled):
        s = stats[layer.name]
        s.slot_input_sq = torch.ones_like(s.slot_input_sq)
        s.slot_hidden_sq = torch.ones_like(s.slot_hidden_sq)
        s.slot_input_sq[slot] = 0.01
        s.slot_hidden_sq[slot] = 0.01
        norms.append((s.slot_input_sq.double().sqrt(), s.slot_hidden_sq.double().sqrt()))
    expected = hand_kept_rows(slot_weights(model), norms, RANK, KEEP)
    for li, slot in enumerate(scaled):
        assert any(k[0] == li and k[2] == slot for k in expected), "design: the scaled slot keeps rows"
    modules = compress_experts(model, rank=RANK, keep_ratio=KEEP, importance="activation", stats=stats, svd="exact",
                               progress=False)
    actual = kept_rows(modules)
    assert actual == expected, f"kept rows per (layer, side, slot): {describe(actual)}, expected {describe(expected)}"


def test_activation_importance_matches_hand_scores_with_collected_norms(tmp_path):
    model, batches = merged_mixtral(tmp_path)
    stats = collect_routing_stats(model, batches, progress=False, input_norms=True)
    norms = [(stats[layer.name].slot_input_sq.double().sqrt(), stats[layer.name].slot_hidden_sq.double().sqrt())
             for layer in moe_layers(model)]
    expected = hand_kept_rows(slot_weights(model), norms, RANK, KEEP)
    assert expected != hand_kept_rows(slot_weights(model), None, RANK, KEEP), "design: the norms change the rows"
    modules = compress_experts(model, rank=RANK, keep_ratio=KEEP, importance="activation", stats=stats, svd="exact",
                               progress=False)
    actual = kept_rows(modules)
    assert actual == expected, f"kept rows per (layer, side, slot): {describe(actual)}, expected {describe(expected)}"


# --- one global threshold -------------------------------------------------------------------------
@pytest.mark.parametrize("importance", ["weight", "activation"])
def test_one_threshold_over_raw_scores_favours_the_matrices_with_larger_residuals(importance, tmp_path):
    """Layer 0's slots are scaled 1.5x: its residual rows score 1.5x higher and layer 0 keeps a far larger
    share of its entries than layer 1. A threshold per matrix (scores divided by their matrix's mean)
    would keep about the same share of every matrix instead."""
    model, batches = merged_mixtral(tmp_path)
    with torch.no_grad():
        first = moe_layers(model)[0].module.experts
        first.w_in *= 1.5
        first.w_out *= 1.5
    stats = collect_routing_stats(model, batches, progress=False, input_norms=True) if importance == "activation" \
        else None
    norms = None if stats is None else [
        (stats[layer.name].slot_input_sq.double().sqrt(), stats[layer.name].slot_hidden_sq.double().sqrt())
        for layer in moe_layers(model)]
    weights = slot_weights(model)
    expected = hand_kept_rows(weights, norms, RANK, KEEP)

    def share(kept, li):
        entries = sum(weights[li][side].shape[2] for (l, side, _, _) in kept if l == li)
        return entries / sum(w.numel() for w in weights[li])

    assert share(expected, 0) > 2 * share(expected, 1), "design: the larger layer keeps a far larger share"
    modules = compress_experts(model, rank=RANK, keep_ratio=KEEP, importance=importance, stats=stats, svd="exact",
                               progress=False)
    actual = kept_rows(modules)
    assert actual == expected, (f"kept share of layer 0 {share(actual, 0):.3f}, layer 1 {share(actual, 1):.3f}; "
                                f"expected {share(expected, 0):.3f}, {share(expected, 1):.3f}")
