"""optimize()d models against transformers' own modules on the cases the other optimize tests leave out.

The reference is always transformers: the HF model itself, or for a merged (or compressed) model the HF model
holding each expert's slot weights (its dense reconstruction) as E full experts. Covered here: Switch expert
capacity that binds (capacity 1-5, long sequences, batch > 1, padding, non-contiguous input), router jitter and
expert dropout in training mode (seeded) with every gradient of a training step (router z-loss and aux loss too),
merged slots whose gradients are the sum of their experts' gradients (tokens on one slot twice), every family's
training gradients, bf16/fp16 models (optimize before or after model.to), generate() with left padding and beam
search, GPT-OSS's clamped SwiGLU where the clamp binds (and exactly at the limit), non-contiguous inputs and
repeated experts, inference_mode, gradient checkpointing, and compressed slots while pruning masks rows.
"""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from transformers import SwitchTransformersForConditionalGeneration

import mcsmoe_fast as mf
from mcsmoe_fast import moe_layers, optimize
from mcsmoe_fast.models.base import expert_weights_per_expert
from mcsmoe_fast.modules import MoEExperts, SwitchMoE
from mcsmoe_fast.modules.experts_spec import ExpertsSpec
from mcsmoe_fast.tiny import FAMILY_NAMES, tiny_moe, tiny_switch

FAMILIES = [*FAMILY_NAMES, "llama4_text"]
GROUPS = [0, 0, 1, 1, 0, 2, 1, 0]  # 8 experts on 3 slots: a token's top-2 often lands twice on slot 0


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny shapes: one thread is enough, and the machine may be shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def ids(seed=0, batch=2, length=12):
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def switch_model(capacity=2, dropout=0.0, jitter=0.0, num_experts=4, num_layers=4):
    config = tiny_switch(num_experts=num_experts, expert_capacity=capacity, num_layers=num_layers).config
    config.dropout_rate, config.router_jitter_noise = dropout, jitter
    torch.manual_seed(0)
    return SwitchTransformersForConditionalGeneration(config).eval()


def switch_inputs(seed=0, batch=3, enc=20, dec=6):
    """Encoder sequences longer than the capacity; the last one ends in 6 padding tokens."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(2, 128, (batch, enc), generator=g)
    mask = torch.ones_like(input_ids)
    input_ids[-1, -6:], mask[-1, -6:] = 0, 0
    decoder_input_ids = torch.randint(2, 128, (batch, dec), generator=g)
    return dict(input_ids=input_ids, attention_mask=mask, decoder_input_ids=decoder_input_ids)


def merge_expand(model, groups=GROUPS):
    """(merged, expanded): every MoE layer merged by hand (slot = mean of its experts, biases too) into MoEExperts,
    and transformers' model holding each expert's slot weights as its own: what the merged model must compute."""
    merged, expanded = copy.deepcopy(model), copy.deepcopy(model)
    emap = torch.tensor(groups)
    for lm, le in zip(moe_layers(merged), moe_layers(expanded)):
        per_expert = expert_weights_per_expert(lm, biases=True)
        slots = [None if t is None else torch.stack([t[emap == g].mean(0) for g in range(int(emap.max()) + 1)])
                 for t in per_expert]
        if slots[2] is not None:
            le.set_expert_weights(*(t[emap] for t in slots))
        else:
            le.set_expert_weights(slots[0][emap], slots[1][emap])
        lm.install_experts(MoEExperts(slots[0], slots[1], emap.clone(), lm.activation, slots[2], slots[3],
                                      lm.activation_args).train(lm.module.training))
    return merged, expanded


def expert_grads(layer) -> list[torch.Tensor | None]:
    """[w_in, w_out, b_in, b_out] gradients of transformers' experts of `layer`, one per expert, canonical layout."""
    experts = layer.module.experts
    if isinstance(experts, torch.nn.ModuleDict):  # Switch: expert_{i}.wi / .wo
        def grad(p):
            return torch.zeros_like(p) if p.grad is None else p.grad
        return [torch.stack([grad(experts[f"expert_{i}"].wi.weight) for i in range(layer.num_experts)]),
                torch.stack([grad(experts[f"expert_{i}"].wo.weight) for i in range(layer.num_experts)]), None, None]
    if type(layer).__name__ == "Llama4Layer":
        return [experts.gate_up_proj.grad.transpose(1, 2), experts.down_proj.grad.transpose(1, 2), None, None]
    spec = ExpertsSpec.of(experts)
    grads = SimpleNamespace(**{n: p.grad for n, p in experts.named_parameters()})
    return [*spec.weights(grads), *spec.biases(grads)]


def assert_grads_close(got: dict, want: dict, rel=1e-4):
    common = [n for n in want if n in got]
    assert common
    for n in common:
        scale = want[n].abs().max().item()
        assert (got[n] - want[n]).abs().max().item() <= rel * scale + 1e-9, n


def assert_slot_grads(merged_layer, expanded_layer, rel=1e-4):
    """A slot's gradient is the sum of the gradients its experts get in the expanded transformers model."""
    slots = merged_layer.module.experts
    emap = slots.expert_map
    for mine, theirs in zip((slots.w_in, slots.w_out, slots.b_in, slots.b_out), expert_grads(expanded_layer)):
        if mine is None:
            assert theirs is None
            continue
        want = torch.zeros_like(mine).index_add_(0, emap, theirs)
        got = torch.zeros_like(mine) if mine.grad is None else mine.grad
        assert (got - want).abs().max().item() <= rel * want.abs().max().item() + 1e-9


def grads(model) -> dict:
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def logits(model, x):
    return model(**x).logits


# --- Switch: capacity that binds, jitter and expert dropout, every gradient ----------------------------------
@pytest.mark.parametrize("capacity", [1, 2, 5])
@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
def test_switch_block_equals_transformers_with_capacity_that_binds(capacity, merged):
    """Block level, 3 sequences of 61 tokens (zero rows where the last one is padded), fed non-contiguous:
    eval output, then training mode with jitter and expert dropout (same seed) and the gradients of the input,
    the router and every expert (a merged slot: the sum of its experts')."""
    model = switch_model(capacity=capacity, dropout=0.3, jitter=0.05, num_layers=2)
    if merged:
        fast, model = merge_expand(model, [0, 1, 1, 0])
        optimize(fast)
    else:
        fast = optimize(copy.deepcopy(model))
    ref_layer, fast_layer = moe_layers(model)[0], moe_layers(fast)[0]
    ref, ours = ref_layer.module, fast_layer.module
    assert isinstance(ours, SwitchMoE) and not ours.dropless
    hidden = torch.randn(61, 3, 32, generator=torch.Generator().manual_seed(capacity)).transpose(0, 1)
    hidden[-1, -9:] = 0  # padding positions still take capacity, in transformers and here
    with torch.no_grad():
        mask, _, _ = ours.router(hidden.clone())  # transformers' router: the dispatch mask, capacity applied
        assert (mask.sum(-1) == 0).any()  # the capacity binds
        torch.testing.assert_close(ours(hidden), ref(hidden.contiguous()), rtol=1e-5, atol=1e-5)

    outs = []
    for block in (ref, ours):
        block.train()
        leaf = hidden.contiguous().requires_grad_(True)
        torch.manual_seed(7)
        out = block(leaf * 1.0)  # a non-leaf: the router's jitter scales its input in place
        (out * torch.linspace(-1, 1, 32)).sum().backward()
        outs.append((out.detach(), leaf.grad))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs[1][1], outs[0][1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.router.classifier.weight.grad, ref.router.classifier.weight.grad,
                               rtol=1e-4, atol=1e-6)
    assert_slot_grads(fast_layer, ref_layer)


def fast_switch(model, merged: bool):
    """(the optimized model, its transformers reference): merged, experts 0 and 3 into one slot and 1 and 2 into
    another, against the model whose experts each hold their slot's weights; else optimize() of a copy."""
    if merged:
        fast, model = merge_expand(model, [0, 1, 1, 0])
        return optimize(fast), model
    return optimize(copy.deepcopy(model)), model


@pytest.mark.parametrize("dropout, jitter", [(0.0, 0.05), (0.3, 0.05)], ids=["fused-jitter", "dropout-jitter"])
@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
def test_switch_training_step_equals_transformers(dropout, jitter, merged):
    """A training step (labels, router z-loss and aux loss) with padding and a capacity that binds: same loss and
    every gradient, the fused op (no expert dropout) and transformers' expert loop (with it) alike."""
    fast, model = fast_switch(switch_model(capacity=2, dropout=dropout, jitter=jitter), merged)
    x = switch_inputs()
    labels = torch.randint(2, 128, (3, 6), generator=torch.Generator().manual_seed(1))
    losses = []
    for m in (model, fast):
        m.train()
        torch.manual_seed(11)
        out = m(**x, labels=labels, output_router_logits=True)
        out.loss.backward()
        losses.append(out.loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=1e-6)
    assert_grads_close(grads(fast), grads(model))
    for mine, theirs in zip(moe_layers(fast), moe_layers(model)):
        assert_slot_grads(mine, theirs)


# --- every family: training gradients, merged slots, half precision, generate ---------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_training_step_gradients_equal_transformers(family):
    """Every parameter's gradient (routers, shared experts, attention, embeddings, experts) of a training step
    with the router aux loss, as transformers computes them."""
    model = tiny_moe(family).train()
    fast = optimize(copy.deepcopy(model))
    x = ids()
    out = []
    for m in (model, fast):
        torch.manual_seed(0)
        result = m(input_ids=x, labels=x, output_router_logits=True)
        result.loss.backward()
        out.append(result.loss.detach())
    torch.testing.assert_close(out[1], out[0], rtol=1e-6, atol=1e-6)
    want, got = grads(model), grads(fast)
    assert want.keys() == got.keys()
    assert_grads_close(got, want)


@pytest.mark.parametrize("family", FAMILIES)
def test_merged_model_trains_as_the_expanded_transformers_model(family):
    """Merged slots (two experts of a token often on one slot): the logits of the expanded transformers model,
    its gradients everywhere else, and per slot the sum of its experts' gradients."""
    merged, expanded = merge_expand(tiny_moe(family))
    optimize(merged)
    x = ids(seed=3)
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=x).logits, expanded(input_ids=x).logits, rtol=1e-5, atol=1e-5)
    for m in (merged, expanded):
        m.train()
        torch.manual_seed(0)
        m(input_ids=x, labels=x).loss.backward()
    assert_grads_close(grads(merged), grads(expanded))
    for mine, theirs in zip(moe_layers(merged), moe_layers(expanded)):
        assert_slot_grads(mine, theirs)


def _within_rounding(got, want, dtype, ulps=2.0):
    """|got - want| within `ulps` units of the dtype's precision at the largest |want| (one or two roundings of
    the output, not an error of the computation)."""
    eps = torch.finfo(dtype).eps
    diff = (got.float() - want.float()).abs().max().item()
    assert diff <= ulps * eps * want.float().abs().max().item(), diff


def _first(output):
    return output[0] if isinstance(output, tuple) else output


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("family", [*FAMILIES, "switch"])
def test_half_precision_models_within_rounding(family, dtype):
    """Each MoE block on the same half-precision input, and the whole model's logits: optimized before or after
    model.to(dtype), and merged (then cast), against transformers' blocks and model in that dtype."""
    if family == "switch":
        base, x = switch_model(capacity=3), switch_inputs()
    else:
        base, x = tiny_moe(family), dict(input_ids=ids())
    merged, expanded = merge_expand(base, [0, 1, 1, 0] if family == "switch" else GROUPS)
    optimize(merged)
    pairs = [(copy.deepcopy(base).to(dtype), optimize(copy.deepcopy(base).to(dtype))),
             (copy.deepcopy(base).to(dtype), optimize(copy.deepcopy(base)).to(dtype)),
             (expanded.to(dtype), merged.to(dtype))]
    hidden = torch.randn(2, 12, 32, generator=torch.Generator().manual_seed(0)).to(dtype)
    with torch.no_grad():
        for ref, fast in pairs:
            for theirs, mine in zip(moe_layers(ref), moe_layers(fast)):
                _within_rounding(_first(mine.module(hidden.clone())), _first(theirs.module(hidden.clone())), dtype)
            _within_rounding(logits(fast, x), logits(ref, x), dtype)


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_with_left_padding_equals_transformers(family):
    """T = 1 decoding on the KV cache (sliding-window, chunked and linear attention included), left padding:
    transformers' tokens and scores, unmerged and merged."""
    x = ids(seed=5, length=9)
    mask = torch.ones_like(x)
    x[0, :3], mask[0, :3] = 0, 0
    base = tiny_moe(family)
    merged, expanded = merge_expand(base)
    optimize(merged)
    for ref, fast in ((base, optimize(copy.deepcopy(base))), (expanded, merged)):
        with torch.no_grad():
            want = ref.generate(input_ids=x, attention_mask=mask, max_new_tokens=4, do_sample=False,
                                output_scores=True, return_dict_in_generate=True)
            got = fast.generate(input_ids=x, attention_mask=mask, max_new_tokens=4, do_sample=False,
                                output_scores=True, return_dict_in_generate=True)
        assert torch.equal(got.sequences, want.sequences)
        for a, b in zip(got.scores, want.scores):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
def test_switch_generate_with_binding_capacity_and_beams(merged):
    fast, model = fast_switch(switch_model(capacity=2), merged)
    x = switch_inputs()
    for beams in (1, 3):
        with torch.no_grad():
            kwargs = dict(input_ids=x["input_ids"], attention_mask=x["attention_mask"], max_new_tokens=5,
                          do_sample=False, num_beams=beams, output_scores=True, return_dict_in_generate=True)
            want, got = model.generate(**kwargs), fast.generate(**kwargs)
        assert torch.equal(got.sequences, want.sequences)
        for a, b in zip(got.scores, want.scores):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# --- the experts themselves: clamp that binds, non-contiguous inputs, repeated experts -------------------------
def _clamping_gpt_oss_experts():
    experts = tiny_moe("gpt_oss").model.layers[0].mlp.experts
    with torch.no_grad():  # pre-activations far past the limit (7) on both sides
        experts.gate_up_proj.normal_(0, 1.0, generator=torch.Generator().manual_seed(0))
        experts.gate_up_proj_bias.normal_(0, 2.0, generator=torch.Generator().manual_seed(1))
    return experts


def _run_experts(experts, impl, hidden, index, weights, cotangent):
    experts = copy.deepcopy(experts)
    experts.config._experts_implementation = impl
    hidden, weights = hidden.clone().requires_grad_(True), weights.clone().requires_grad_(True)
    out = experts(hidden, index, weights)
    (out * cotangent).sum().backward()
    return [out.detach(), hidden.grad, weights.grad, *(p.grad for _, p in sorted(experts.named_parameters()))]


def test_gpt_oss_clamped_swiglu_where_the_clamp_binds_and_at_the_limit():
    experts = _clamping_gpt_oss_experts()
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(40, 32, generator=g)
    index = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(40)])
    weights = torch.rand(40, 2, generator=g)
    pre = hidden @ experts.gate_up_proj[0] + experts.gate_up_proj_bias[0]
    assert (pre[:, 0::2] > experts.limit).float().mean() > 0.05  # the gate clamp binds
    assert (pre[:, 1::2].abs() > experts.limit).float().mean() > 0.05  # and the up clamp
    cotangent = torch.linspace(-1, 1, 32)
    for want, got in zip(_run_experts(experts, "eager", hidden, index, weights, cotangent),
                         _run_experts(experts, "mcsmoe_fast", hidden, index, weights, cotangent)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())

    with torch.no_grad():  # gate and up exactly at +-limit: torch.clamp passes the gradient there
        experts.gate_up_proj.zero_()
        experts.gate_up_proj_bias.zero_()
        experts.gate_up_proj_bias[:, 0::2] = experts.limit
        experts.gate_up_proj_bias[:, 1::4] = experts.limit
        experts.gate_up_proj_bias[:, 3::4] = -experts.limit
    for want, got in zip(_run_experts(experts, "eager", hidden[:6], index[:6], weights[:6], cotangent),
                         _run_experts(experts, "mcsmoe_fast", hidden[:6], index[:6], weights[:6], cotangent)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item() + 1e-7)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_experts_take_non_contiguous_inputs_and_repeated_experts(family):
    """Hidden states, indices and weights as strided views, and a token naming one expert twice: the eager
    experts' output and gradients (fp32), and their output in bf16 within rounding."""
    experts = moe_layers(tiny_moe(family))[0].module.experts
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(32, 9, generator=g).t()
    index = torch.randint(0, 8, (2, 9), generator=g).t()
    index[3] = 5  # expert 5 twice for token 3
    weights = torch.rand(2, 9, generator=g).t()
    assert not (hidden.is_contiguous() or index.is_contiguous() or weights.is_contiguous())
    cotangent = torch.linspace(-1, 1, 32)
    for want, got in zip(_run_experts(experts, "eager", hidden, index, weights, cotangent),
                         _run_experts(experts, "mcsmoe_fast", hidden, index, weights, cotangent)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 + 1e-5 * want.abs().max().item())
    half = copy.deepcopy(experts).to(torch.bfloat16)
    routing = weights if family == "mixtral" else weights.to(torch.bfloat16)  # as each family's router returns them
    with torch.no_grad():
        half.config._experts_implementation = "eager"
        want = half(hidden.to(torch.bfloat16), index, routing)
        half.config._experts_implementation = "mcsmoe_fast"
        got = half(hidden.to(torch.bfloat16), index, routing)
    assert got.dtype == want.dtype == torch.bfloat16
    _within_rounding(got, want, torch.bfloat16, ulps=4.0)


# --- modes: inference_mode, gradient checkpointing, compressed slots while pruning --------------------------------
@pytest.mark.parametrize("family", ["switch", "gpt_oss", "llama4_text"])
def test_inference_mode_equals_no_grad_and_transformers(family):
    if family == "switch":
        base, x = switch_model(capacity=3), switch_inputs()
    else:
        base, x = tiny_moe(family), dict(input_ids=ids())
    merged, expanded = merge_expand(base, [0, 1, 1, 0] if family == "switch" else GROUPS)
    compressed = copy.deepcopy(merged)
    mf.compress_experts(compressed, rank=10**6, keep_ratio=1.0, progress=False)  # the merged function
    for fast, ref in ((optimize(copy.deepcopy(base)), base), (optimize(merged), expanded),
                      (optimize(compressed), expanded)):
        with torch.no_grad():
            want, plain = logits(ref, x), logits(fast, x)
        with torch.inference_mode():
            inferred = logits(fast, x)
        torch.testing.assert_close(inferred, plain, rtol=0, atol=0)
        torch.testing.assert_close(inferred, want, rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated")
@pytest.mark.parametrize("case", ["switch-dropout-merged", "mixtral-compressed", "llama4_text"])
@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_gradient_checkpointing_gradients_equal_transformers(case, reentrant):
    """Recomputed forwards (same RNG state: the same jitter and dropout masks) give transformers' gradients."""
    if case.startswith("switch"):
        base, x = switch_model(capacity=2, dropout=0.3, jitter=0.05), switch_inputs()
        labels = x["decoder_input_ids"]
        fast, ref = merge_expand(base, [0, 1, 1, 0])
    else:
        family = case.split("-")[0]
        base, x = tiny_moe(family), dict(input_ids=ids())
        labels = x["input_ids"]
        if case.endswith("compressed"):
            fast, ref = merge_expand(base)
            mf.compress_experts(fast, rank=10**6, keep_ratio=1.0, progress=False)
        else:
            fast, ref = copy.deepcopy(base), base
    optimize(fast)
    for m in (ref, fast):
        m.train()
        m.config.use_cache = False
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        torch.manual_seed(0)
        m(**x, labels=labels).loss.backward()
    assert_grads_close(grads(fast), grads(ref))


@pytest.mark.parametrize("family", ["gpt_oss", "llama4_text", "switch"])
def test_compressed_slots_while_pruning_equal_their_reconstruction_in_transformers(family):
    """Low rank, a share of the rows kept and half of those masked (pruning in progress): the transformers model
    holding each expert's reconstructed slot (U V + kept rows) computes the same logits and gradients, and masked
    rows get no gradient."""
    if family == "switch":
        base, x = switch_model(capacity=3), switch_inputs()
        labels, groups = x["decoder_input_ids"], [0, 1, 1, 0]
    else:
        base, x = tiny_moe(family), dict(input_ids=ids())
        labels, groups = x["input_ids"], GROUPS
    fast, ref = merge_expand(base, groups)
    mf.compress_experts(fast, rank=4, keep_ratio=0.3, progress=False)
    optimize(fast)
    g = torch.Generator().manual_seed(1)
    for mine, theirs in zip(moe_layers(fast), moe_layers(ref)):
        slots = mine.module.experts
        slots.set_keep(torch.rand(slots.in_S_rows.shape[0], generator=g) > 0.5,
                       torch.rand(slots.out_S_rows.shape[0], generator=g) > 0.5)
        w_in, w_out = slots.dense_weights()
        emap = slots.expert_map
        if slots.b_in is not None:
            theirs.set_expert_weights(w_in[emap], w_out[emap], slots.b_in.detach()[emap], slots.b_out.detach()[emap])
        else:
            theirs.set_expert_weights(w_in[emap], w_out[emap])
    with torch.no_grad():
        torch.testing.assert_close(logits(fast, x), logits(ref, x), rtol=1e-5, atol=1e-5)
    for m in (fast, ref):
        m.train()
        torch.manual_seed(0)
        m(**x, labels=labels).loss.backward()
    assert_grads_close(grads(fast), grads(ref))
    for layer in moe_layers(fast):
        slots = layer.module.experts
        assert slots.in_S_rows.grad[~slots.in_keep].abs().max() == 0
        assert slots.out_S_rows.grad[~slots.out_keep].abs().max() == 0


@pytest.mark.parametrize("family", ["switch", "mixtral", "deepseek_v3", "llama4_text"])
def test_tied_router_scores_pick_transformers_experts(family):
    """Router rows duplicated (every token's scores tie between experts 1 and 2, and 5 and 6) and those experts
    given different weights: the optimized and the merged model pick the experts transformers picks."""
    if family == "switch":
        base, x = switch_model(capacity=3), switch_inputs()
        pairs, groups = [(1, 2)], [0, 1, 1, 0]
    else:
        base, x = tiny_moe(family), dict(input_ids=ids())
        pairs, groups = [(1, 2), (5, 6)], GROUPS
    with torch.no_grad():
        for layer in moe_layers(base):
            weight = layer.router_weight()
            for a, b in pairs:
                weight[b] = weight[a]
            if family == "deepseek_v3":  # the correction bias moves the choice: tie it too
                bias = layer.module.gate.e_score_correction_bias
                for a, b in pairs:
                    bias[b] = bias[a]
    with torch.no_grad():
        logits_ = logits(base, x)
        torch.testing.assert_close(logits(optimize(copy.deepcopy(base)), x), logits_, rtol=1e-5, atol=1e-5)
        merged, expanded = merge_expand(base, groups)
        optimize(merged)
        torch.testing.assert_close(logits(merged, x), logits(expanded, x), rtol=1e-5, atol=1e-5)
