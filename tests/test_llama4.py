"""Llama-4 text MoE (llama4_text) through every step, against transformers' own Llama4ForCausalLM (eager):
the adapter and its fused block (models/llama4.py) and the pipeline on tiny random models
saved with save_pretrained and loaded back through the real loading code (merge_helpers.build)."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

import mcsmoe_fast as mf
from mcsmoe_fast.activations import apply
from mcsmoe_fast.models.llama4 import Llama4Layer
from mcsmoe_fast.modules import CompressedMoEExperts, MoEExperts
from mcsmoe_fast.models.llama4 import Llama4MoE
from mcsmoe_fast.tiny import tiny_moe
from merge_helpers import build
from test_families import batches, close, ids, logits, merge_then_compress

MOE_NAMES = ["model.layers.1.feed_forward", "model.layers.3.feed_forward"]  # interleave step 2: odd layers


@pytest.fixture(params=[1, 2], ids=["top1", "top2"])
def model(request, tmp_path):
    """A tiny Llama-4 (4 layers, MoE on 1 and 3, 8 experts, top-1 as released, top-2 as the edge case)."""
    return build("llama4_text", tmp_path, top_k=request.param)


def test_moe_layers_are_the_sparse_blocks_only(model):
    layers = mf.moe_layers(model)
    assert [layer.name for layer in layers] == MOE_NAMES
    assert all(isinstance(layer, Llama4Layer) for layer in layers)
    for layer in layers:
        assert (layer.num_experts, layer.top_k, layer.activation) == (8, model.config.num_experts_per_tok, "swiglu")
        w_in, w_out = layer.expert_weights()
        assert w_in.shape == (8, 96, 32) and w_out.shape == (8, 32, 48)
        assert layer.expert_biases() == (None, None)


def test_canonical_view_computes_each_expert_and_writes_back(model):
    """w_in [E, 2ff, d] (gate rows, then up rows) and w_out [E, d, ff] are transformers' gate_up_proj [E, d, 2ff]
    and down_proj [E, ff, d]: the canonical FFN equals Llama4TextExperts on that expert; writing back is exact
    and lands where transformers reads it."""
    layer = mf.moe_layers(model)[0]
    experts = layer.module.experts
    x = torch.randn(5, 32)
    w_in, w_out = layer.expert_weights()
    for e in (0, 6):
        rows = torch.zeros(8, 5, 32)
        rows[e] = x  # transformers' experts take every expert's rows, [E * T, d]
        theirs = experts(rows.reshape(-1, 32)).view(8, 5, 32)[e]
        close(layer.hidden_activations(x, e) @ w_out[e].T, theirs)
        close(apply(x @ w_in[e].T, "swiglu") @ w_out[e].T, theirs)
    before = {k: v.clone() for k, v in experts.state_dict().items()}
    layer.set_expert_weights(w_in.clone(), w_out.clone())
    assert all(torch.equal(v, before[k]) for k, v in experts.state_dict().items())
    layer.set_expert_weights(w_in.flip(1).clone(), w_out.flip(2).clone())  # up row ff-1 becomes gate row 0
    assert torch.equal(experts.gate_up_proj[:, :, 0], before["gate_up_proj"][:, :, -1])
    assert torch.equal(experts.down_proj[:, 0], before["down_proj"][:, -1])


@pytest.mark.parametrize("strategy", ["weight", "activation"])
def test_alignment_preserves_the_logits(model, strategy):
    before = logits(model)
    w_before = mf.moe_layers(model)[0].expert_weights()[0].clone()
    perms = mf.align_experts(model, strategy=strategy, batches=batches(), progress=False)
    assert set(perms) == set(MOE_NAMES)
    assert not torch.equal(mf.moe_layers(model)[0].expert_weights()[0], w_before)
    close(logits(model), before)


def test_routing_statistics_count_the_experts_llama4_router_picks(model):
    """Counts equal the experts whose router score is non-zero in transformers' own forward."""
    seen = {}
    hooks = [layer.module.router.register_forward_hook(
        lambda m, args, out, name=layer.name: seen.setdefault(name, []).append((out[0] > 0).sum(0)))
        for layer in mf.moe_layers(model)]
    data = batches()
    with torch.no_grad():
        for b in data:
            model(**b)
    for h in hooks:
        h.remove()
    stats = mf.collect_routing_stats(model, data, progress=False)
    k = model.config.num_experts_per_tok
    for name in MOE_NAMES:
        expected = torch.stack(seen[name]).sum(0).double()
        assert expected.sum() == 3 * 24 * k
        assert torch.equal(stats[name].counts.cpu(), expected), name


def test_input_statistics_and_saliency_see_the_score_scaled_inputs(model):
    """Llama-4's experts run on s x (s = the router's sigmoid score): the input and hidden sums of squares that
    activation importance weighs, and REAP's saliency ||f_e(s x)||, equal what transformers' own experts module
    receives and returns in its forward (its input holds s x for the chosen experts, 0 for the others)."""
    layer = mf.moe_layers(model)[0]
    experts = layer.module.experts
    seen = []
    hook = experts.register_forward_hook(lambda m, args, out: seen.append((args[0].detach(), out.detach())))
    data = batches()
    with torch.no_grad():
        for b in data:
            model(**b)
    hook.remove()
    e = layer.num_experts
    x_sq, h_sq = torch.zeros(e, 32, dtype=torch.float64), torch.zeros(e, 48, dtype=torch.float64)
    sal, count = torch.zeros(e, dtype=torch.float64), torch.zeros(e, dtype=torch.float64)
    for rows, out in seen:
        rows, out = rows.view(e, -1, 32).double(), out.view(e, -1, 32).double()
        for j in range(e):
            routed = rows[j].abs().sum(-1) > 0  # unchosen experts get zero rows
            xs = rows[j][routed]
            gate, up = (xs @ experts.gate_up_proj[j].double()).chunk(2, dim=-1)
            x_sq[j] += xs.square().sum(0)
            h_sq[j] += (torch.nn.functional.silu(gate) * up).square().sum(0)
            sal[j] += out[j][routed].norm(dim=-1).sum()
            count[j] += routed.sum()
    stats = mf.collect_routing_stats(model, data, input_norms=True, saliency="reap", progress=False)[layer.name]
    assert torch.equal(stats.counts.cpu(), count)
    torch.testing.assert_close(stats.slot_input_sq.cpu(), x_sq, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(stats.slot_hidden_sq.cpu(), h_sq, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(stats.saliency.cpu(), sal / count.clamp_min(1), rtol=1e-5, atol=1e-7)


def test_merge_with_every_group_equals_the_original(model):
    before = logits(model)
    mf.merge_experts(model, mf.collect_routing_stats(model, batches(), progress=False), num_groups=8,
                     globally=False, progress=False)
    assert all(isinstance(layer.module, Llama4MoE) and isinstance(layer.module.experts, MoEExperts)
               for layer in mf.moe_layers(model))
    close(logits(model), before)


def test_merged_model_saves_loads_and_exports_dense(model, tmp_path):
    stats = mf.collect_routing_stats(model, batches(), progress=False)
    groups = mf.merge_experts(model, stats, num_groups=3, globally=False, progress=False)
    merged = logits(model)
    for layer in mf.moe_layers(model):
        assert layer.module.experts.num_slots == groups[layer.name].num_groups == 3
        assert type(layer.module.shared_expert).__name__ == "Llama4TextMLP"  # never merged
    assert type(model.model.layers[0].feed_forward).__name__ == "Llama4TextMLP"  # dense layer left alone

    loaded = mf.from_pretrained(mf.save_pretrained(model, tmp_path / "merged"))
    torch.testing.assert_close(logits(loaded), merged, rtol=0, atol=0)
    for a, b in zip(mf.moe_layers(loaded), mf.moe_layers(model)):
        assert torch.equal(a.expert_map(), b.expert_map())

    mf.save_pretrained(model, tmp_path / "dense", export_dense=True)
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense").eval()
    assert type(dense.model.layers[1].feed_forward).__name__ == "Llama4TextMoe"  # transformers' own block
    close(logits(dense), merged)


def test_two_experts_of_a_token_on_one_merged_slot_get_their_own_inputs(tmp_path):
    """Top-2 with both of a token's experts in one slot: the slot runs on s1 x and on s2 x (not once on
    x with s1 + s2), as transformers' model with the group's weights in both experts computes it."""
    model = build("llama4_text", tmp_path, top_k=2)
    mf.merge_experts(model, mf.collect_routing_stats(model, batches(), progress=False), num_groups=1,
                     globally=False, progress=False)
    mf.save_pretrained(model, tmp_path / "dense", export_dense=True)
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense").eval()
    close(logits(model), logits(dense))


def test_compression_runs_and_matches_the_reference(model, tmp_path):
    """MC-SMoE's "then compress": full rank keeping every row is the merged model; a real compression runs
    each block as the plain reference on the reconstructed slots, saves and reloads exactly, and trains."""
    data = batches()

    def runs_as_the_reference(layer):
        block = layer.module
        assert isinstance(block.experts, CompressedMoEExperts)
        x = torch.randn(7, 32)
        with torch.no_grad():
            close(block(x)[0], reference_block(block, x))

    loaded = merge_then_compress(model, data, tmp_path, runs_as_the_reference)
    loaded.train()
    loaded(**data[0]).logits.pow(2).mean().backward()
    assert mf.moe_layers(loaded)[0].module.experts.in_U.grad.abs().sum() > 0


@torch.no_grad()
def reference_block(block: Llama4MoE, x: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch: shared expert + for each chosen expert e (dropped ones never) the dense slot FFN on
    sigmoid(logit_e) * x."""
    logits = x @ block.router.weight.T
    keep = getattr(block.router, "keep", None)
    logits = logits if keep is None else logits.masked_fill(~keep, float("-inf"))
    top = logits.topk(block.top_k, dim=1)
    experts = block.experts
    w_in, w_out = experts.dense_weights() if isinstance(experts, CompressedMoEExperts) else (experts.w_in, experts.w_out)
    slot = block.experts.expert_map[top.indices]
    out = block.shared_expert(x)
    for t in range(x.shape[0]):
        for j in range(block.top_k):
            xs = torch.sigmoid(top.values[t, j]) * x[t]
            out[t] += apply(w_in[slot[t, j]] @ xs, "swiglu") @ w_out[slot[t, j]].T
    return out


def test_optimize_gives_transformers_logits_and_keeps_its_names(model, tmp_path):
    """optimize() puts the fast block on transformers' own experts: same logits, same state-dict names, and
    transformers' own save_pretrained still works (no plain-save guard)."""
    before, names = logits(model), sorted(model.state_dict())
    assert mf.optimize(model) is model
    assert all(isinstance(layer.module, Llama4MoE) for layer in mf.moe_layers(model))
    close(logits(model), before)
    assert sorted(model.state_dict()) == names
    model.save_pretrained(tmp_path)
    close(logits(AutoModelForCausalLM.from_pretrained(tmp_path).eval()), before)


def test_fast_block_lays_the_parameters_out_canonically_in_place_and_sees_later_edits(model, tmp_path):
    """The fast block's experts are transformers' own Parameters (same objects, shapes, values), re-laid out so that
    each expert's canonical rows are contiguous; nothing is cached, so an in-place edit through .data (how many
    tools patch weights) changes the output as it changes transformers' eager block."""
    eager = copy.deepcopy(model)
    experts = mf.moe_layers(model)[0].module.experts
    params = experts.gate_up_proj, experts.down_proj
    values = [p.detach().clone() for p in params]
    mf.optimize(model)
    assert (experts.gate_up_proj, experts.down_proj) == params  # the same Parameter objects
    for p, v in zip(params, values):
        assert p.shape == v.shape and torch.equal(p, v) and p.transpose(1, 2).is_contiguous()
    for m in (model, eager):
        mf.moe_layers(m)[0].module.experts.gate_up_proj.data.mul_(3.0)
    close(logits(model), logits(eager))
    model.save_pretrained(tmp_path)  # transformers' own save of the re-laid-out parameters
    close(logits(AutoModelForCausalLM.from_pretrained(tmp_path).eval()), logits(eager))


def test_fast_block_keeps_transformers_names_and_runs_the_fused_op(model, tmp_path, monkeypatch):
    before, names = logits(model), sorted(model.state_dict())
    for layer in mf.moe_layers(model):
        layer.install_fast_block()
    calls = []
    real = mf.ops.grouped_expert_ffn
    monkeypatch.setattr(mf.ops, "grouped_expert_ffn", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    close(logits(model), before)
    k = model.config.num_experts_per_tok
    assert calls == [(24 * k, 32)] * 2  # one fused call per MoE layer, one row per (token, chosen expert)
    assert sorted(model.state_dict()) == names
    model.save_pretrained(tmp_path)  # transformers' own save and load: nothing renamed
    close(logits(AutoModelForCausalLM.from_pretrained(tmp_path).eval()), before)


def grads_of(model) -> dict[str, torch.Tensor]:
    model.train()
    model(input_ids=ids(), labels=ids(1)).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("how", ["fast_block", "optimize"])
def test_training_gradients_equal_transformers(model, how):
    """Autograd through the fused op: every gradient (router, experts, shared expert, attention) equals eager
    transformers', on the fast block over transformers' experts and through optimize()."""
    ours = copy.deepcopy(model)
    expected = grads_of(model)
    if how == "fast_block":
        for layer in mf.moe_layers(ours):
            layer.install_fast_block()
    else:
        mf.optimize(ours)
    got = grads_of(ours)
    assert sorted(got) == sorted(expected)
    assert expected[f"{MOE_NAMES[0]}.router.weight"].abs().sum() > 0
    for name, g in expected.items():
        close(got[name], g, tol=1e-4)


def test_merged_blocks_train(model):
    """A merged block's slots and router get gradients through the fused op (the score scales the input)."""
    mf.merge_experts(model, mf.collect_routing_stats(model, batches(), progress=False), num_groups=3, progress=False)
    grads = grads_of(model)
    assert grads[f"{MOE_NAMES[0]}.experts.w_in"].abs().sum() > 0
    assert grads[f"{MOE_NAMES[0]}.router.weight"].abs().sum() > 0


def test_drop_baseline_masks_the_router_and_saves(model, tmp_path):
    """strategy='drop': the dominant experts keep their weights, the router never picks a dropped expert
    (its logit is -inf before Llama4Router's top-k), and the masked model saves and reloads exactly."""
    stats = mf.collect_routing_stats(model, batches(), progress=False)
    groupings = mf.merge_experts(model, stats, num_groups=3, globally=False, strategy="drop", progress=False)
    x = torch.randn(9, 32)
    for layer in mf.moe_layers(model):
        dropped = torch.tensor([e for e in range(8) if e not in groupings[layer.name].dominant])
        keep = layer.logit_mask()
        assert keep is not None and not keep[dropped].any()
        with torch.no_grad():
            scores, router_logits = layer.module.router(x)
            assert (scores[:, dropped] == 0).all() and torch.isinf(router_logits[:, dropped]).all()
            assert not torch.isin(layer.route(x)[1], dropped).any()
            close(layer.module(x)[0], reference_block(layer.module, x))
    masked = logits(model)
    recounted = mf.collect_routing_stats(model, batches(), progress=False)
    assert all((recounted[n].counts[~mf.moe_layers(model)[i].logit_mask()] == 0).all() for i, n in enumerate(MOE_NAMES))
    loaded = mf.from_pretrained(mf.save_pretrained(model, tmp_path / "dropped"))
    torch.testing.assert_close(logits(loaded), masked, rtol=0, atol=0)
    assert all(layer.logit_mask() is not None for layer in mf.moe_layers(loaded))


def test_a_block_of_another_layout_is_refused_by_name():
    model = tiny_moe("llama4_text", top_k=1)
    experts = model.model.layers[1].feed_forward.experts
    experts.gate_up_proj = torch.nn.Parameter(experts.gate_up_proj.detach().transpose(1, 2).contiguous())
    with pytest.raises(ValueError, match=r"gate_up_proj \[E, d, 2ff\]"):
        mf.moe_layers(model)
    with pytest.raises(ValueError, match="quick_gelu"):
        mf.moe_layers(tiny_moe("llama4_text", hidden_act="quick_gelu"))


def test_streamed_merge_and_permute_equal_the_in_memory_pipeline(tmp_path):
    """Larger than memory: Llama-4 streams through its own forward with a device map (its chunked attention
    and dense layers run as transformers runs them), reading and writing its transposed banks by name."""
    from mcsmoe_fast.streaming import permute_checkpoint
    from merge_helpers import calibration
    from streaming_helpers import NUM_GROUPS, assert_same_checkpoint, in_memory, quiet_merge

    src = tmp_path / "llama4"
    tiny_moe("llama4_text", seed=5).save_pretrained(src, max_shard_size="60KB")
    data = calibration(mf.open_model(str(src)), seed=7, batches=3, batch=2, length=9)
    expected = in_memory(src, tmp_path / "expected", data)
    result = quiet_merge(src, tmp_path / "streamed", data, NUM_GROUPS, device_map="auto", max_memory="50KB")
    assert result.offloaded
    assert_same_checkpoint(expected, result.path, data)

    perms = permute_checkpoint(src, tmp_path / "permuted", reference=1, progress=False)
    model = mf.open_model(str(src))
    assert set(perms) == set(mf.align_experts(model, reference=1, progress=False)) == set(MOE_NAMES)
    aligned, want = AutoModelForCausalLM.from_pretrained(tmp_path / "permuted").state_dict(), model.state_dict()
    assert sorted(aligned) == sorted(want) and all(torch.equal(aligned[k], want[k]) for k in want)
