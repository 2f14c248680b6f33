"""REAP saliency, expert pruning, REAM-style merging and `compare` against independent plain-PyTorch references
written from the definitions (docs/methods.md; REAP eq. 9; REAM's pseudo-grouping), on tiny models of the families
whose routing differs: Mixtral (softmax top-k, renormalised), Qwen2-MoE and OLMoE (softmax, not renormalised),
Switch (top-1, capacity, encoder and decoder), DeepSeek-V3 (sigmoid, correction bias, routing groups), GPT-OSS
(biased router, softmax over the top-k logits, expert biases, interleaved clamped SwiGLU), Llama-4 (sigmoid score
scaling the expert input). The references read the raw transformers tensors; none of the package's routing,
grouping, alignment or merging code is used to build them (session 31's audit of the field's methods).

Not repeated here: what tests/test_reap.py, test_ream.py, test_compare.py and test_mutants_calibrate.py check
(Mixtral saliency in both modes, DeepSeek and Qwen2 reap-softmax against the router's own weights, the Mixtral
masked-router equality, REAM on Mixtral without alignment, compare rows against the package's own pipeline)."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

import mcsmoe_fast as mf
from mcsmoe_fast.checkpoint import save_pretrained, to_standard
from mcsmoe_fast.compare import compare_methods
from mcsmoe_fast.models.hub import load_model
from mcsmoe_fast.prune import kept_experts, prune_experts
from mcsmoe_fast.ream import ream_experts
from mcsmoe_fast.tiny import tiny_mixtral, tiny_moe, tiny_switch

ACT = {"silu": F.silu, "relu": F.relu}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- the references ------------------------------------------------------------------------------------------------
def tiny(family: str, **kw):
    if family == "switch":
        return tiny_switch(num_layers=2, **kw)
    if family == "mixtral":
        return tiny_mixtral(num_layers=2, **kw)
    return tiny_moe(family, num_layers=2, **kw)


def saved(family: str, tmp_path, **kw):
    """(the package's model loaded from a saved tiny checkpoint, a vanilla transformers copy of it, its class)."""
    src = tiny(family, **kw)
    src.save_pretrained(tmp_path / family)
    return load_model(str(tmp_path / family)), type(src).from_pretrained(tmp_path / family).eval(), type(src)


def batches_for(model, seed=1, n=2, batch=3, length=10):
    """Input dicts with right padding in some rows (and, for Switch, decoder inputs padded differently)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(3, model.config.vocab_size, (batch, length), generator=g)
        mask = torch.ones_like(ids)
        mask[0, length // 2:] = 0
        mask[-1, length - 2:] = 0
        ids[mask == 0] = 0
        b = {"input_ids": ids, "attention_mask": mask}
        if model.config.model_type == "switch_transformers":
            dec = torch.randint(3, model.config.vocab_size, (batch, 8), generator=g)
            dmask = torch.ones_like(dec)
            dmask[1, 5:] = 0
            dmask[-1, 2:] = 0
            b.update(decoder_input_ids=dec, decoder_attention_mask=dmask)
        out.append(b)
    return out


def moe_blocks(model):
    return {n: m for n, m in model.named_modules()
            if hasattr(m, "experts") and (hasattr(m, "gate") or hasattr(m, "router")) and not n.endswith(".experts")}


def router_of(block):
    return block.router if hasattr(block, "router") else block.gate


def num_experts_of(model, block):
    r = router_of(block)
    return (r.classifier.weight if model.config.model_type == "switch_transformers" else r.weight).shape[0]


def expert_out(model, block, e, x):
    """f_e(x) [n, d] in float64, from the raw weights of transformers' experts module."""
    kind, ex = model.config.model_type, block.experts
    if kind == "switch_transformers":
        m = ex[f"expert_{e}"]
        return ACT[model.config.dense_act_fn](x @ m.wi.weight.double().T) @ m.wo.weight.double().T
    if kind == "gpt_oss":
        gu = x @ ex.gate_up_proj[e].double() + ex.gate_up_proj_bias[e].double()
        gate, up = gu[..., ::2].clamp(max=ex.limit), gu[..., 1::2].clamp(-ex.limit, ex.limit)
        return ((up + 1) * gate * torch.sigmoid(gate * ex.alpha)) @ ex.down_proj[e].double() + ex.down_proj_bias[e].double()
    gate, up = (x @ ex.gate_up_proj[e].double().T).chunk(2, dim=-1)
    return (ACT[model.config.hidden_act](gate) * up) @ ex.down_proj[e].double().T


def route(model, block, x, keep=None):
    """(weights [T, k], chosen [T, k], softmax over all experts or None) of the block's router on x [T, d] (float64),
    only the experts with keep[e] eligible (None: all), written from each family's definition."""
    kind, cfg, r = model.config.model_type, model.config, router_of(block)
    if kind == "switch_transformers":
        logits = x @ r.classifier.weight.double().T
    else:
        logits = x @ r.weight.double().T + (r.bias.double() if getattr(r, "bias", None) is not None else 0)
    if kind == "deepseek_v3":
        e, ng = logits.shape[1], cfg.n_group
        scores = torch.sigmoid(logits)
        choice = scores + r.e_score_correction_bias.double()
        if keep is not None:
            choice = choice.masked_fill(~keep, float("-inf"))
        group_score = choice.view(-1, ng, e // ng).topk(2, dim=-1).values.sum(-1)
        groups = torch.zeros_like(group_score, dtype=torch.bool).scatter(
            1, group_score.topk(cfg.topk_group, dim=-1).indices, True)
        choice = choice.masked_fill(~groups.repeat_interleave(e // ng, dim=1), float("-inf"))
        idx = choice.topk(cfg.num_experts_per_tok, dim=-1).indices
        w = scores.gather(1, idx)
        w = w / (w.sum(-1, keepdim=True) + 1e-20) if cfg.norm_topk_prob else w
        return w * cfg.routed_scaling_factor, idx, None
    if keep is not None:
        logits = logits.masked_fill(~keep, float("-inf"))
    if kind == "gpt_oss":
        top, idx = logits.topk(cfg.num_experts_per_tok, dim=-1)
        return torch.softmax(top, -1), idx, torch.softmax(logits, -1)
    probs = torch.softmax(logits, -1)
    w, idx = probs.topk(1 if kind == "switch_transformers" else cfg.num_experts_per_tok, dim=-1)
    if kind == "mixtral" or getattr(cfg, "norm_topk_prob", False):
        w = w / w.sum(-1, keepdim=True)
    return w, idx, probs


@torch.no_grad()
def block_inputs(model, batches):
    """{block name: its inputs [N, d] (float64) over the tokens that are not padding}."""
    blocks, enc_dec = moe_blocks(model), model.config.is_encoder_decoder
    seen, masks = {n: [] for n in blocks}, {}

    def hook(name):
        def receive(_, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            mask = masks["decoder" if enc_dec and name.startswith("decoder.") else "encoder"]
            seen[name].append(h[mask.bool()] if mask is not None else h.reshape(-1, h.shape[-1]))
        return receive

    handles = [m.register_forward_pre_hook(hook(n), with_kwargs=True) for n, m in blocks.items()]
    try:
        for b in batches:
            masks.update(encoder=b.get("attention_mask"), decoder=b.get("decoder_attention_mask"))
            model(**b)
    finally:
        for h in handles:
            h.remove()
    return blocks, {n: torch.cat(v).double() for n, v in seen.items()}


@torch.no_grad()
def reference_saliency(model, batches, mode):
    """{block: (S [E], counts [E])}: S_j = mean over the tokens whose top-k holds j of g_j(x) ||f_j(x)||_2, g per
    docs/methods.md (reap: softmax renormalised over the chosen experts; reap-softmax: the plain softmax; DeepSeek's
    sigmoid router: its own top-k weights in both modes)."""
    blocks, inputs = block_inputs(model, batches)
    out = {}
    for name, block in blocks.items():
        x = inputs[name]
        w, idx, probs = route(model, block, x)
        if probs is None:
            g = w
        else:
            g = probs.gather(1, idx)
            g = g / g.sum(-1, keepdim=True) if mode == "reap" else g
        e = num_experts_of(model, block)
        s, c = torch.zeros(e, dtype=torch.float64), torch.zeros(e, dtype=torch.float64)
        for j in range(e):
            t, slot = torch.where(idx == j)
            if len(t):
                s[j] = (g[t, slot] * expert_out(model, block, j, x[t]).norm(dim=-1)).mean()
                c[j] = len(t)
        out[name] = (s, c)
    return out


def top(scores, m, n_group=1):
    """The m highest scores (ties: lower index), m / n_group from each routing group, in index order."""
    size = len(scores) // n_group
    kept = []
    for j in range(n_group):
        kept += sorted(range(j * size, (j + 1) * size), key=lambda i: (-float(scores[i]), i))[: m // n_group]
    return sorted(kept)


def restrict_routers(model, kept):
    """Route every MoE block of the vanilla `model` among kept[name] only (replacing its router's forward by
    route() with the others ineligible; Switch keeps its expert capacity)."""
    kind = model.config.model_type
    for name, block in moe_blocks(model).items():
        r, e = router_of(block), num_experts_of(model, block)
        keep = torch.zeros(e, dtype=torch.bool)
        keep[kept[name]] = True
        if kind == "switch_transformers":
            def forward(hidden, r=r, block=block, keep=keep, e=e):
                w, idx, _ = route(model, block, hidden.reshape(-1, hidden.shape[-1]).double(), keep)
                onehot = F.one_hot(idx[:, 0], e).view(*hidden.shape[:-1], e)
                onehot = onehot * (torch.cumsum(onehot, dim=-2) <= r.expert_capacity)
                return onehot, w.view(*hidden.shape[:-1], 1).to(hidden.dtype), torch.zeros(*hidden.shape[:-1], e)
        elif kind == "llama4_text":
            def forward(hidden, r=r, keep=keep):
                logits = F.linear(hidden, r.weight, r.bias).masked_fill(~keep, float("-inf"))
                values, index = logits.topk(r.top_k, dim=1)
                return torch.sigmoid(torch.full_like(logits, float("-inf")).scatter_(1, index, values)), logits
        else:
            def forward(hidden, *extra, block=block, keep=keep, e=e):
                x = hidden.reshape(-1, hidden.shape[-1]).double()
                w, idx, _ = route(model, block, x, keep)
                return torch.zeros(x.shape[0], e), w.to(hidden.dtype), idx
        r.forward = forward


def logits_of(model, batch):
    with torch.no_grad():
        return model(**batch).logits


# --- saliency --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family, mode", [("switch", "reap"), ("switch", "reap-softmax"), ("qwen2_moe", "reap"),
                                          ("olmoe", "reap"), ("gpt_oss", "reap"), ("gpt_oss", "reap-softmax"),
                                          ("deepseek_v3", "reap-softmax")])
def test_saliency_and_counts_match_the_definition_with_padding(tmp_path, family, mode):
    """Every MoE layer's saliency and usage counts over the non-padding tokens (Switch: encoder layers by
    attention_mask, decoder layers by decoder_attention_mask, padded differently) equal the definition."""
    model, vanilla, _ = saved(family, tmp_path)
    batches = batches_for(model)
    stats = mf.collect_routing_stats(model, batches, saliency=mode, progress=False, chunk_tokens=5)
    expected = reference_saliency(vanilla, batches, mode)
    assert list(stats) == list(expected)
    for name, s in stats.items():
        sal, counts = expected[name]
        assert torch.equal(s.counts.double().cpu(), counts)
        assert (sal > 0).sum() >= 3
        torch.testing.assert_close(s.saliency.double().cpu(), sal, rtol=2e-5, atol=1e-9)


def test_saliency_modes_differ_where_the_router_does_not_renormalise(tmp_path):
    """Qwen2-MoE (norm_topk_prob=False): "reap" renormalises over the top-k, "reap-softmax" does not, per token; the
    two saliencies are not proportional (documented rule, not a constant factor)."""
    model, _, _ = saved("qwen2_moe", tmp_path)
    batches = batches_for(model)
    a = mf.collect_routing_stats(model, batches, saliency="reap", progress=False)
    b = mf.collect_routing_stats(model, batches, saliency="reap-softmax", progress=False)
    for name in a:
        ratio = (b[name].saliency / a[name].saliency)[a[name].counts > 0]
        assert (ratio < 1).all() and ratio.max() - ratio.min() > 1e-3


def test_padded_tokens_do_not_count(tmp_path):
    """Padding positions change nothing: other pad ids give the same statistics, and they equal those of the
    same sequences without their padding (a causal model's real tokens do not see right padding)."""
    model, _, _ = saved("mixtral", tmp_path)
    batches = batches_for(model)
    stats = mf.collect_routing_stats(model, batches, saliency="reap", progress=False)
    other = [dict(b, input_ids=torch.where(b["attention_mask"].bool(), b["input_ids"], 77)) for b in batches]
    again = mf.collect_routing_stats(model, other, saliency="reap", progress=False)
    trimmed = []
    for b in batches:
        for row, mask in zip(b["input_ids"], b["attention_mask"]):
            n = int(mask.sum())
            trimmed.append({"input_ids": row[None, :n], "attention_mask": mask[None, :n]})
    alone = mf.collect_routing_stats(model, trimmed, saliency="reap", progress=False)
    for name, s in stats.items():
        assert torch.equal(s.counts, again[name].counts) and torch.equal(s.counts, alone[name].counts)
        assert s.tokens == alone[name].tokens == sum(int(b["attention_mask"].sum()) for b in batches)
        torch.testing.assert_close(s.saliency, again[name].saliency, rtol=1e-6, atol=0)
        torch.testing.assert_close(s.saliency, alone[name].saliency, rtol=1e-5, atol=1e-9)


# --- which experts are kept, and the pruned model -----------------------------------------------------------------
@pytest.mark.parametrize("family", ["switch", "qwen2_moe", "deepseek_v3", "gpt_oss"])
def test_pruned_model_is_the_original_routed_among_the_kept_experts(tmp_path, family):
    """The experts kept are the reference saliency's top M (DeepSeek: M / n_group per routing group); the pruned
    model, and its standard checkpoint loaded by vanilla transformers, give the logits of the original model whose
    router may choose only the kept experts (Switch with an expert capacity that drops tokens)."""
    kw = {"expert_capacity": 3} if family == "switch" else {}
    model, vanilla, cls = saved(family, tmp_path, **kw)
    batches = batches_for(model)
    stats = mf.collect_routing_stats(model, batches, saliency="reap", progress=False)
    pruned = prune_experts(model, stats, num_experts=4)
    kept = {n: e["kept"] for n, e in pruned.config.mcsmoe_prune["layers"].items()}
    n_group = getattr(model.config, "n_group", 1) if family == "deepseek_v3" else 1
    expected = {n: top(s, 4, n_group) for n, (s, _) in reference_saliency(vanilla, batches, "reap").items()}
    assert kept == expected and any(k != [0, 1, 2, 3] for k in kept.values())
    full = logits_of(vanilla, batches[0])
    restrict_routers(vanilla, kept)
    want = logits_of(vanilla, batches[0])
    assert (want - full).abs().max() > 1e-4  # the restriction matters on these inputs
    torch.testing.assert_close(logits_of(pruned, batches[0]), want, rtol=1e-4, atol=1e-5)
    save_pretrained(pruned, tmp_path / "pruned", format="standard")
    torch.testing.assert_close(logits_of(cls.from_pretrained(tmp_path / "pruned").eval(), batches[0]), want,
                               rtol=1e-4, atol=1e-5)


def test_llama4_pruned_model_is_the_original_routed_among_the_kept_experts(tmp_path):
    model, vanilla, cls = saved("llama4_text", tmp_path)
    batches = batches_for(model)
    pruned = prune_experts(model, mf.collect_routing_stats(model, batches, saliency="reap", progress=False),
                           num_experts=4)
    kept = {n: e["kept"] for n, e in pruned.config.mcsmoe_prune["layers"].items()}
    full = logits_of(vanilla, batches[0])
    restrict_routers(vanilla, kept)
    want = logits_of(vanilla, batches[0])
    assert (want - full).abs().max() > 1e-4
    torch.testing.assert_close(logits_of(pruned, batches[0]), want, rtol=1e-4, atol=1e-5)


def test_never_routed_experts_tie_at_zero_and_the_lower_index_is_kept(tmp_path):
    """GPT-OSS with router biases of -1e4 on experts 0, 2 and 5: never routed, saliency and count 0. Keeping 6 of
    8 keeps the 5 routed experts and, of the tied zeros, expert 0; REAP and frequency alike. The pruned model still
    equals the original (expert 0 is never chosen in either)."""
    model, vanilla, _ = saved("gpt_oss", tmp_path)
    for m in (model, vanilla):
        with torch.no_grad():
            for block in moe_blocks(m).values():
                block.router.bias[[0, 2, 5]] = -1e4
    batches = batches_for(model)
    stats = mf.collect_routing_stats(model, batches, saliency="reap", progress=False)
    for name, (s, c) in reference_saliency(vanilla, batches, "reap").items():
        assert (s[[0, 2, 5]] == 0).all() and (c[[0, 2, 5]] == 0).all() and (s > 0).sum() == 5
        torch.testing.assert_close(stats[name].saliency.double().cpu(), s, rtol=2e-5, atol=1e-9)
    for method in ("reap", "frequency"):
        assert set(map(tuple, kept_experts(model, stats, num_experts=6, method=method).values())) == {(0, 1, 3, 4, 6, 7)}
    pruned = prune_experts(model, stats, num_experts=6)
    torch.testing.assert_close(logits_of(pruned, batches[0]), logits_of(vanilla, batches[0]), rtol=1e-4, atol=1e-5)


def test_bad_statistics_are_refused_by_name(tmp_path):
    model, _, _ = saved("mixtral", tmp_path)
    other = tiny_mixtral(num_layers=2, num_experts=4)
    batches = batches_for(model, n=1)
    foreign = mf.collect_routing_stats(other, batches, saliency="reap", bases=("expert-output",), progress=False)
    with pytest.raises(ValueError, match="no routing statistics of layer 'model.layers.0.mlp' with 8 experts"):
        prune_experts(model, foreign, num_experts=4)
    with pytest.raises(ValueError, match="has 4 experts, the layer has 8"):
        ream_experts(model, foreign, num_experts=4, progress=False)
    no_outputs = mf.collect_routing_stats(model, batches, saliency="reap", progress=False)
    with pytest.raises(ValueError, match="expert outputs were not collected"):
        ream_experts(model, no_outputs, num_experts=4, progress=False)


# --- REAM ------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def canonical(model, block, e):
    """([gate rows, up rows] or [rows], each with the input bias as a last column where there is one; down [d, ff];
    output bias or None) of expert e, from the raw tensors of the family's layout."""
    kind, ex = model.config.model_type, block.experts
    if kind == "switch_transformers":
        m = ex[f"expert_{e}"]
        return [m.wi.weight.double()], m.wo.weight.double(), None
    if kind == "gpt_oss":
        gu, b = ex.gate_up_proj[e].double(), ex.gate_up_proj_bias[e].double()
        return ([torch.cat([gu[:, ::2].T, b[::2, None]], 1), torch.cat([gu[:, 1::2].T, b[1::2, None]], 1)],
                ex.down_proj[e].double().T, ex.down_proj_bias[e].double())
    gu = ex.gate_up_proj[e].double()
    return list(gu.chunk(2)), ex.down_proj[e].double(), None


def aligned(ref, target):
    """target's hidden neurons reordered to the reference's: the assignment maximising the summed dot products of
    each neuron's rows and down-projection column (scipy's solver)."""
    cost = sum(a @ b.T for a, b in zip(ref[0], target[0])) + ref[1].T @ target[1]
    perm = torch.as_tensor(linear_sum_assignment(cost.numpy(), maximize=True)[1])
    return [r[perm] for r in target[0]], target[1][:, perm], target[2]


@torch.no_grad()
def reference_ream(model, batches, k, cap):
    """{block: {centroid: (members, merged canonical tensors)}} by docs/methods.md: centroids the k most salient,
    groups filled centroid by centroid with the most similar free experts (cosine of mean outputs over every token)
    up to cap members, members aligned to the centroid and averaged with saliency weights (zeros raised to just
    below the smallest positive saliency: never-routed experts rank after every routed one)."""
    saliency = reference_saliency(model, batches, "reap")
    blocks, inputs = block_inputs(model, batches)
    out = {}
    for name, block in blocks.items():
        e, x = num_experts_of(model, block), inputs[name]
        means = torch.stack([expert_out(model, block, j, x).mean(0) for j in range(e)])
        unit = means / means.norm(dim=-1, keepdim=True)
        sim = unit @ unit.T
        s = saliency[name][0].clone()
        s[s <= 0] = torch.nextafter(s[s > 0].min(), torch.zeros((), dtype=s.dtype))
        centroids = sorted(range(e), key=lambda i: (-float(s[i]), i))[:k]
        leader = {c: c for c in centroids}
        for c in centroids:
            free = sorted((j for j in range(e) if j not in leader), key=lambda j: (-float(sim[c, j]), j))
            leader.update({j: c for j in free[: cap - 1]})
        merged = {}
        for c in centroids:
            members = sorted(j for j, lead in leader.items() if lead == c)
            w = s[members] / s[members].sum()
            ref = canonical(model, block, c)
            parts = [ref if m == c else aligned(ref, canonical(model, block, m)) for m in members]
            rows = [sum(wi * p[0][r] for wi, p in zip(w, parts)) for r in range(len(ref[0]))]
            down = sum(wi * p[1] for wi, p in zip(w, parts))
            bias = None if ref[2] is None else sum(wi * p[2] for wi, p in zip(w, parts))
            merged[c] = (members, (rows, down, bias))
        out[name] = merged
    return out


@pytest.mark.parametrize("family", ["gpt_oss", "switch", "qwen2_moe"])
def test_ream_groups_aligned_weights_and_router_rows_match_the_reference(tmp_path, family):
    """ream_experts (weight-matching alignment on) then the standard checkpoint, loaded by vanilla transformers:
    groups, every merged tensor (biases, GPT-OSS's interleaved gate/up, w_out) and the centroid's router row and
    bias equal the reference's."""
    model, vanilla, cls = saved(family, tmp_path)
    batches = batches_for(model)
    if family == "switch":  # the reference feeds the decoder as the statistics pass does by default
        batches = [{k: v for k, v in b.items() if not k.startswith("decoder")} for b in batches]
        for b in batches:
            b.update(decoder_input_ids=model._shift_right(b["input_ids"]), decoder_attention_mask=b["attention_mask"])
    stats = mf.collect_routing_stats(model, batches, bases=("expert-output",), saliency="reap", progress=False)
    groupings = ream_experts(model, stats, num_experts=3, max_group_size=4, progress=False)
    expected = reference_ream(vanilla, batches, 3, 4)
    to_standard(model, router="dominant").save_pretrained(tmp_path / "ream")
    loaded = cls.from_pretrained(tmp_path / "ream").eval()
    new_blocks, old_blocks = moe_blocks(loaded), moe_blocks(vanilla)
    for name, g in groupings.items():
        assert {c: sorted(m) for c, m in zip(g.dominant, g.groups)} == {c: m for c, (m, _) in expected[name].items()}
        assert any(len(m) > 2 for m in g.groups)
        for slot, c in enumerate(g.dominant):
            rows, down, bias = canonical(loaded, new_blocks[name], slot)
            want = expected[name][c][1]
            for got_t, want_t in zip([*rows, down] + ([bias] if bias is not None else []),
                                     [*want[0], want[1]] + ([want[2]] if want[2] is not None else [])):
                torch.testing.assert_close(got_t, want_t, rtol=1e-5, atol=1e-6)
            old_r, new_r = router_of(old_blocks[name]), router_of(new_blocks[name])
            if family == "switch":
                old_r, new_r = old_r.classifier, new_r.classifier
            assert torch.equal(new_r.weight[slot], old_r.weight[c])
            if getattr(old_r, "bias", None) is not None:
                assert torch.equal(new_r.bias[slot], old_r.bias[c])


# --- compare ---------------------------------------------------------------------------------------------------------
def plain_perplexity(model, windows):
    with torch.no_grad():
        logits = model(input_ids=windows).logits.double()
    return math.exp(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1)).item())


def standard_mixtral(vanilla, per_block):
    """A vanilla Mixtral with, per block, the router rows `rows` and the experts [(gate, up, down)] given."""
    from transformers import MixtralForCausalLM

    config = copy.deepcopy(vanilla.config)
    config.num_local_experts = len(next(iter(per_block.values()))[0])
    model = MixtralForCausalLM(config).eval()
    state = dict(vanilla.state_dict())
    for name, (rows, experts) in per_block.items():
        state[f"{name}.gate.weight"] = vanilla.get_submodule(name).gate.weight.detach()[rows]
        state[f"{name}.experts.gate_up_proj"] = torch.stack([torch.cat(list(g_u)) for g_u, _ in experts]).float()
        state[f"{name}.experts.down_proj"] = torch.stack([down for _, down in experts]).float()
    model.load_state_dict(state)
    return model


def test_compare_rows_are_the_perplexity_of_independently_built_models(tmp_path):
    """compare_methods' reap, frequency and ream rows at 50% equal the plain cross-entropy perplexity of vanilla
    Mixtrals built here from the references (kept experts' tensors and router rows; REAM's aligned saliency-weighted
    merges under their centroids' rows), and the full row that of the input model."""
    model, vanilla, _ = saved("mixtral", tmp_path, seed=3)
    batches = batches_for(model, seed=2, length=12)
    windows = torch.randint(3, 128, (5, 16), generator=torch.Generator().manual_seed(7))
    rows = {r["method"]: r for r in compare_methods(model, batches, windows, ["reap", "frequency", "ream"], [0.5],
                                                    progress=False)["rows"]}
    assert rows["full"]["perplexity"] == pytest.approx(plain_perplexity(vanilla, windows), rel=1e-6)
    saliency = reference_saliency(vanilla, batches, "reap")
    for method, which in (("reap", 0), ("frequency", 1)):
        per_block = {}
        for name, scores in saliency.items():
            kept = top(scores[which], 4)
            block = vanilla.get_submodule(name)
            per_block[name] = (kept, [(c[0], c[1]) for c in (canonical(vanilla, block, e) for e in kept)])
        assert rows[method]["experts"] == 4 and rows[method]["expert_share"] == pytest.approx(0.5)
        assert rows[method]["perplexity"] == pytest.approx(plain_perplexity(standard_mixtral(vanilla, per_block),
                                                                            windows), rel=1e-6), method
    ream = {name: (list(groups), [(merged[0], merged[1]) for _, merged in groups.values()])
            for name, groups in reference_ream(vanilla, batches, 4, 16).items()}
    assert rows["ream"]["perplexity"] == pytest.approx(plain_perplexity(standard_mixtral(vanilla, ream), windows),
                                                       rel=1e-6)
    assert len({round(r["perplexity"], 6) for r in rows.values()}) == 4  # the rows are different models


def test_compare_command_row_is_plain_transformers_on_the_pruned_checkpoint(tmp_path, capsys):
    """`mcsmoe-fast compare` (reap, 50%) against `mcsmoe-fast prune` with the same calibration options, the saved
    checkpoint loaded by AutoModelForCausalLM and scored here: the eval text tokenized as one stream, cut into
    non-overlapping --eval-length windows, exp(mean next-token cross-entropy). The full row likewise."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mcsmoe_fast.cli import main
    from test_cli_merge import LINES, tiny_tokenizer

    tiny_mixtral(seed=5).save_pretrained(tmp_path / "m")
    tiny_tokenizer().save_pretrained(tmp_path / "m")
    (tmp_path / "calib.txt").write_text("\n".join(LINES * 4) + "\n")
    (tmp_path / "eval.txt").write_text(" ".join(LINES * 6))
    assert main([str(a) for a in ["compare", "--model", tmp_path / "m", "--calib", tmp_path / "calib.txt",
                                  "--eval-text", tmp_path / "eval.txt", "--eval-length", 16, "--methods", "reap",
                                  "--ratios", "0.5", "--out", tmp_path / "out"]]) == 0
    assert main([str(a) for a in ["prune", "--model", tmp_path / "m", "--calib", tmp_path / "calib.txt",
                                  "--ratio", 0.5, "--out", tmp_path / "pruned"]]) == 0
    capsys.readouterr()
    rows = {r["method"]: r for r in json.loads((tmp_path / "out" / "results.json").read_text())["rows"]}
    ids = AutoTokenizer.from_pretrained(tmp_path / "m")((tmp_path / "eval.txt").read_text(),
                                                        add_special_tokens=False)["input_ids"]
    windows = torch.tensor(ids[: len(ids) // 16 * 16]).view(-1, 16)
    assert windows.shape[0] >= 4
    for method, directory in (("full", "m"), ("reap", "pruned")):
        plain = plain_perplexity(AutoModelForCausalLM.from_pretrained(tmp_path / directory).eval(), windows)
        assert rows[method]["perplexity"] == pytest.approx(plain, rel=1e-6), method
    assert rows["reap"]["perplexity"] != pytest.approx(rows["full"]["perplexity"], rel=1e-6)
