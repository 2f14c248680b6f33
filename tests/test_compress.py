"""compress_experts, CompressedMoEExperts and CompressionPruner: decomposition, the global row threshold,
function preservation, the fused path against the dense reconstruction, checkpoints, errors."""
import json
import re

import pytest
import torch

from mcsmoe_fast import (
    CompressionPruner, collect_routing_stats, compress_experts, from_pretrained, merge_experts, moe_layers, optimize,
    save_pretrained,
)
from mcsmoe_fast import reference
from mcsmoe_fast.checkpoint import WEIGHTS_NAME
from mcsmoe_fast.compress import global_keep, lowrank_factors
from mcsmoe_fast.modules.compressed import CompressedMoEExperts
from merge_helpers import build, calibration, forward

FAMILIES = ["switch", "mixtral"]


def merged(family, tmp_path, num_groups=4):
    model = build(family, tmp_path)
    batches = calibration(model)
    stats = collect_routing_stats(model, batches, progress=False)
    merge_experts(model, stats, num_groups, globally=False, progress=False)
    return model, batches


def kept_rows(model):
    return [(m.in_S_rows.shape[0], m.out_S_rows.shape[0]) for m in model.modules()
            if isinstance(m, CompressedMoEExperts)]


# --- decomposition ----------------------------------------------------------------------------------
@pytest.mark.parametrize("svd", ["exact", "randomized"])
@pytest.mark.parametrize("shape", [(3, 40, 24), (2, 17, 50)])
def test_lowrank_factors_are_the_truncated_svd(svd, shape):
    g = torch.Generator().manual_seed(1)
    W = torch.randn(*shape, generator=g, dtype=torch.float64)
    r = 5
    U, V = lowrank_factors(W, r, svd)
    assert U.shape == (*shape[:2], r) and V.shape == (shape[0], r, shape[2])
    u, s, vh = torch.linalg.svd(W, full_matrices=False)
    best = (u[..., :r] * s[..., None, :r]) @ vh[..., :r, :]
    err = (W - U @ V).norm(dim=(-2, -1))
    best_err = (W - best).norm(dim=(-2, -1))
    assert torch.all(err >= best_err * (1 - 1e-9))
    assert torch.all(err <= best_err * (1.0 + (1e-9 if svd == "exact" else 0.05)))
    # balanced factors: U = U_r sqrt(s), V = sqrt(s) Vh -> equal column / row norms
    torch.testing.assert_close(U.norm(dim=-2), V.norm(dim=-1))


def test_lowrank_factors_rank_is_clipped_and_full_rank_is_exact():
    W = torch.randn(2, 6, 9, dtype=torch.float64)
    U, V = lowrank_factors(W, 100, "auto")
    assert U.shape[-1] == 6
    torch.testing.assert_close(U @ V, W)


def test_global_keep_counts_entries_and_never_revives_pruned_rows():
    a = torch.tensor([5.0, 1.0, 3.0])  # rows of length 10
    b = torch.tensor([4.0, float("-inf"), 2.0, 6.0])  # rows of length 5
    ka, kb = global_keep([a, b], [10, 5], 0.5)  # budget: 0.5 * 50 = 25 entries
    # by score: 6 (b, 5), 5 (a, 10), 4 (b, 5) = 20; next 3 (a, 10) would exceed 25
    assert ka.tolist() == [True, False, False] and kb.tolist() == [True, False, False, True]
    ka, kb = global_keep([a, b], [10, 5], 1.0)
    assert ka.all() and kb.tolist() == [True, False, True, True]


# --- function preservation and the fused path ---------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_full_rank_keep_all_reproduces_the_model(family, tmp_path):
    model, batches = merged(family, tmp_path)
    before = [forward(model, b) for b in batches]
    compress_experts(model, rank=10_000, keep_ratio=1.0, progress=False)
    assert all(isinstance(layer.module.experts, CompressedMoEExperts) for layer in moe_layers(model))
    for b, ref in zip(batches, before):
        torch.testing.assert_close(forward(model, b), ref, rtol=0, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("importance", ["weight", "activation"])
def test_compressed_model_equals_its_dense_reconstruction(family, importance, tmp_path):
    model, batches = merged(family, tmp_path)
    stats = collect_routing_stats(model, batches, progress=False, input_norms=True)
    compress_experts(model, rank=3, keep_ratio=0.2, importance=importance,
                     stats=stats if importance == "activation" else None, progress=False)
    optimize(model)
    dense = save_pretrained(model, tmp_path / "dense", export_dense=True)
    from mcsmoe_fast.models.hub import load_model

    vanilla = load_model(str(dense))  # transformers' own modules with the reconstructed weights
    for b in batches:
        torch.testing.assert_close(forward(model, b), forward(vanilla, b), rtol=1e-4, atol=1e-4)


def slot_banks(g: torch.Generator, d: int, ff: int):
    """Banks of 3 compressed swiglu slots (float64): w_in rank 4 with 3, 0 and 7 kept rows, w_out rank 2
    with 1, 5 and 2."""
    def bank(out, inp, r, k):
        return [torch.randn(3, out, r, generator=g, dtype=torch.float64),
                torch.randn(3, r, inp, generator=g, dtype=torch.float64),
                torch.randn(sum(k), inp, generator=g, dtype=torch.float64),
                torch.cat([torch.randperm(out, generator=g)[:n] for n in k]),
                torch.tensor([0, k[0], k[0] + k[1], sum(k)])]

    return bank(2 * ff, d, 4, [3, 0, 7]), bank(d, ff, 2, [1, 5, 2])


def test_grouped_module_matches_reference_with_and_without_gradients():
    g = torch.Generator().manual_seed(3)
    d, ff, E, T = 12, 10, 6, 25
    w_in, w_out = slot_banks(g, d, ff)
    experts = CompressedMoEExperts(w_in, w_out, torch.tensor([0, 1, 2, 0, 1, 2]), "swiglu")
    hidden = torch.randn(T, d, generator=g, dtype=torch.float64)
    idx = torch.stack([torch.randperm(E, generator=g)[:2] for _ in range(T)])
    idx[4, 1] = -1
    weights = torch.rand(T, 2, generator=g, dtype=torch.float64)
    ref = reference.grouped_expert_ffn_slr(hidden, w_in, w_out, experts.expert_map, idx, weights, "swiglu")
    with torch.no_grad():
        torch.testing.assert_close(experts(hidden, idx, weights), ref)
    out = experts(hidden.requires_grad_(), idx, weights)  # the differentiable per-slot path
    torch.testing.assert_close(out, ref)
    out.sum().backward()
    assert experts.in_S_rows.grad is not None and experts.out_U.grad is not None and hidden.grad is not None


@pytest.mark.parametrize("which", ["b_in", "b_out", "both"])
def test_module_with_biases_and_clamped_swiglu_matches_reference_and_its_gradients(which):
    """GPT-OSS's experts compressed: dense biases next to the banks, clamped SwiGLU with its own alpha and
    limit; the fused op and the differentiable path against the dense reference, gradients included."""
    g = torch.Generator().manual_seed(4)
    S, d, ff, E, T = 3, 12, 10, 6, 25
    w_in, w_out = slot_banks(g, d, ff)
    b_in = torch.randn(S, 2 * ff, generator=g, dtype=torch.float64) if which != "b_out" else None
    b_out = torch.randn(S, d, generator=g, dtype=torch.float64) if which != "b_in" else None
    args = dict(alpha=1.3, limit=2.5)
    experts = CompressedMoEExperts(w_in, w_out, torch.tensor([0, 1, 2, 0, 1, 2]), "clamped_swiglu", b_in, b_out,
                                   args)
    hidden = torch.randn(T, d, generator=g, dtype=torch.float64)
    idx = torch.stack([torch.randperm(E, generator=g)[:2] for _ in range(T)])
    weights = torch.rand(T, 2, generator=g, dtype=torch.float64)
    ref_b_in, ref_b_out = (None if b is None else b.clone().requires_grad_() for b in (b_in, b_out))
    ref = reference.grouped_expert_ffn_slr(hidden, w_in, w_out, experts.expert_map, idx, weights, "clamped_swiglu",
                                           ref_b_in, ref_b_out, **args)
    with torch.no_grad():
        torch.testing.assert_close(experts(hidden, idx, weights), ref)
        plain = CompressedMoEExperts(w_in, w_out, experts.expert_map, "clamped_swiglu", activation_args=args)
        assert not torch.allclose(plain(hidden, idx, weights), ref)  # the biases count
    out = experts(hidden, idx, weights)  # the differentiable per-slot path (parameters require grad)
    torch.testing.assert_close(out, ref)
    out.sum().backward()
    ref.sum().backward()
    for mine, theirs in ((experts.b_in, ref_b_in), (experts.b_out, ref_b_out)):
        if theirs is not None:
            torch.testing.assert_close(mine.grad, theirs.grad)
    with pytest.raises(ValueError, match="b_out must be"):
        CompressedMoEExperts(w_in, w_out, experts.expert_map, "clamped_swiglu", None, torch.zeros(S, d + 1))


# --- options --------------------------------------------------------------------------------------
def test_layers_option_compresses_only_the_chosen_layers(tmp_path):
    model, _ = merged("switch", tmp_path)
    names = [layer.name for layer in moe_layers(model)]
    compress_experts(model, rank=2, keep_ratio=0.1, layers=[names[1]], progress=False)
    kinds = [type(layer.module.experts).__name__ for layer in moe_layers(model)]
    assert kinds[1] == "CompressedMoEExperts" and kinds.count("CompressedMoEExperts") == 1


@pytest.mark.parametrize("keep_ratio", [0.05, 0.3])
def test_keep_ratio_sets_the_stored_share_of_entries(keep_ratio, tmp_path):
    model, _ = merged("mixtral", tmp_path)
    modules = compress_experts(model, rank=2, keep_ratio=keep_ratio, progress=False).values()
    kept = sum(m.in_S_rows.numel() + m.out_S_rows.numel() for m in modules)
    total = sum(m.in_U.shape[0] * (m.in_U.shape[1] * m.in_V.shape[2] + m.out_U.shape[1] * m.out_V.shape[2])
                for m in modules)
    assert keep_ratio * total * 0.9 <= kept <= keep_ratio * total


def test_rank_option_sets_factor_width_and_svd_option_changes_factors(tmp_path):
    model, _ = merged("mixtral", tmp_path)
    m = next(iter(compress_experts(model, rank=5, keep_ratio=0.1, svd="exact", progress=False).values()))
    assert m.in_U.shape[2] == 5 and m.out_U.shape[2] == 5
    model2, _ = merged("mixtral", tmp_path)
    m2 = next(iter(compress_experts(model2, rank=5, keep_ratio=0.1, svd="randomized", progress=False).values()))
    assert not torch.equal(m.in_U, m2.in_U)


def test_activation_importance_uses_the_input_norms(tmp_path):
    model, batches = merged("mixtral", tmp_path)
    stats = collect_routing_stats(model, batches, progress=False, input_norms=True)
    for s in stats.values():  # make a few input features dominate: rows heavy on them must win
        s.slot_input_sq[:, :3] *= 1e6
    by_weight = kept_rows_of(model, tmp_path, "weight", None)
    assert kept_rows_of(model, tmp_path, "weight", None) == by_weight  # deterministic
    by_activation = kept_rows_of(model, tmp_path, "activation", stats)
    assert by_weight != by_activation


def kept_rows_of(model, tmp_path, importance, stats):
    import copy

    m = copy.deepcopy(model)
    modules = compress_experts(m, rank=2, keep_ratio=0.2, importance=importance, stats=stats, progress=False,
                               svd="randomized")
    return [mod.in_row_idx.tolist() for mod in modules.values()]


# --- pruning during training ----------------------------------------------------------------------
def test_pruner_schedule_is_cubic_between_warmups(tmp_path):
    model, _ = merged("mixtral", tmp_path)
    compress_experts(model, rank=2, keep_ratio=0.1, importance="gradient", progress=False)
    p = CompressionPruner(model, keep_ratio=0.1, total_steps=10, initial_warmup=2, final_warmup=3)
    assert [p.kept_fraction(s) for s in (1, 2)] == [1.0, 1.0]
    assert p.kept_fraction(3) == pytest.approx(0.1 + 0.9 * (1 - 1 / 5) ** 3)
    assert p.kept_fraction(7) == pytest.approx(0.1)  # progress reaches 1 at total - final warm-up
    assert [p.kept_fraction(s) for s in (8, 9, 10)] == [0.1] * 3


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_pruner_masks_by_gradient_importance_and_finalize_compacts(family, tmp_path):
    model, batches = merged(family, tmp_path)
    compress_experts(model, rank=2, keep_ratio=0.2, importance="gradient", progress=False)
    full = kept_rows(model)
    pruner = CompressionPruner(model, keep_ratio=0.2, total_steps=4, initial_warmup=1, final_warmup=1)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    model.train()
    shares, masks = [], []
    for step in range(4):
        inputs = dict(batches[0], labels=batches[0]["input_ids"])
        model(**inputs).loss.backward()
        opt.step()
        shares.append(pruner.step())
        opt.zero_grad()
        masks.append([m.in_keep.clone() for m in pruner.modules])
    assert shares[0] == 1.0 and shares[-1] == 0.2 and shares[1] < 1.0
    for before, after in zip(masks, masks[1:]):  # a masked row stays masked
        assert all(not (a & ~b).any() for b, a in zip(before, after))
    # a masked row stays masked even when its smoothed importance is the highest
    for ema, m in zip(pruner.ema[::2], pruner.modules):
        ema[~m.in_keep] = 1e9
    pruner.step(update_scores=False)  # the scores as set here (the gradients were zeroed)
    assert all(not (m.in_keep & ~before).any() for m, before in zip(pruner.modules, masks[-1]))
    with pytest.raises(ValueError, match="still being pruned"):
        save_pretrained(model, tmp_path / "mid")
    pruner.finalize()
    model.eval()
    assert all(k[0] < f[0] for k, f in zip(kept_rows(model), full))
    b = batches[1]
    torch.testing.assert_close(forward(model, b), forward(from_pretrained(save_pretrained(model, tmp_path / "c")), b))


# --- checkpoints -----------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_checkpoint_stores_factors_and_kept_rows_only(family, tmp_path):
    model, batches = merged(family, tmp_path)
    merged_path = save_pretrained(model, tmp_path / "merged")
    compress_experts(model, rank=2, keep_ratio=0.1, progress=False)
    path = save_pretrained(model, tmp_path / "compressed")
    from safetensors import safe_open

    def expert_bytes(p):
        with safe_open(str(p / WEIGHTS_NAME), "pt") as f:
            return sum(f.get_tensor(k).nbytes for k in f.keys() if ".experts." in k)

    assert expert_bytes(path) < 0.5 * expert_bytes(merged_path)
    loaded = from_pretrained(path)
    assert kept_rows(loaded) == kept_rows(model)
    for b in batches:
        assert torch.equal(forward(loaded, b), forward(model, b))
    entry = next(iter(json.loads((path / "config.json").read_text())["mcsmoe_merge"]["layers"].values()))
    assert entry["compressed"]["rank_in"] == 2


# --- errors ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    (dict(rank=0), "rank must be"), (dict(rank=2.5), "rank must be"), (dict(keep_ratio=0.0), "keep_ratio"),
    (dict(keep_ratio=1.5), "keep_ratio"), (dict(importance="fisher"), "importance must be"),
    (dict(svd="qr"), "svd must be"), (dict(layers=["nope"]), "unknown MoE layers"),
    (dict(importance="activation"), "needs stats"),
])
def test_bad_arguments_raise_before_changing_the_model(kwargs, match, tmp_path):
    model, batches = merged("mixtral", tmp_path)
    before = forward(model, batches[0])
    with pytest.raises(ValueError, match=match):
        compress_experts(model, progress=False, **kwargs)
    assert not kept_rows(model)
    assert torch.equal(forward(model, batches[0]), before)


def test_compressing_twice_and_stale_stats_raise(tmp_path):
    model, batches = merged("mixtral", tmp_path)
    stats_before_merge = collect_routing_stats(build("mixtral", tmp_path), batches, progress=False, input_norms=True)
    with pytest.raises(ValueError, match="slots"):
        compress_experts(model, importance="activation", stats=stats_before_merge, progress=False)
    compress_experts(model, rank=2, progress=False)
    with pytest.raises(ValueError, match="already compressed"):
        compress_experts(model, rank=2, progress=False)
    with pytest.raises(ValueError, match="already finalized"):
        CompressionPruner(model, 0.1, total_steps=3)
    with pytest.raises(ValueError, match="compressed"):
        moe_layers(model)[0].set_expert_weights(*moe_layers(model)[0].expert_weights())


@pytest.mark.parametrize("spoil", ["missing", "stale"])
def test_statistics_wrong_for_a_later_layer_leave_every_layer_as_it_was(spoil, tmp_path):
    """The statistics of every layer are checked before the first one is replaced: a refusal about the last
    layer leaves the earlier ones dense, and a retry with good statistics compresses them all."""
    model, batches = merged("mixtral", tmp_path)
    stats = collect_routing_stats(model, batches, progress=False, input_norms=True)
    last = moe_layers(model)[-1].name
    bad = dict(stats)
    if spoil == "missing":
        del bad[last]
    else:
        bad[last] = collect_routing_stats(build("mixtral", tmp_path), batches, progress=False,
                                          input_norms=True)[last]
    before = forward(model, batches[0])
    with pytest.raises(ValueError, match=re.escape(repr(last))):
        compress_experts(model, importance="activation", stats=bad, progress=False)
    assert not kept_rows(model)
    assert torch.equal(forward(model, batches[0]), before)
    assert len(compress_experts(model, importance="activation", stats=stats, progress=False)) == len(stats)
