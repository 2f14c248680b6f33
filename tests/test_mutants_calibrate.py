"""calibrate.py behaviours that no other test checked, each seen unnoticed under a one-line mutation
(benchmarks/MUTATION.md): the JSON summary, where and in which dtype the accumulators live, the message of
a mismatched mask, one-token batches, float64 sums of squares and Gram matrices, the per-slot input norms
(every slot, every chunk, only chosen experts), the expert-output basis with expert biases, and offloaded
blocks. Expected values are computed here independently: integer weights and tokens make every statistic
of a tiny Switch layer an exact integer, summed by hand in float64."""
import re
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import mcsmoe_fast.calibrate as calibrate
from mcsmoe_fast import moe_layers
from mcsmoe_fast.calibrate import LayerStats, layer_accumulator
from mcsmoe_fast.drop import install_logit_mask
from mcsmoe_fast.tiny import tiny_mixtral, tiny_moe, tiny_switch

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
ALL_BASES = ("router-logits", "feature", "expert-output")

# Tokens [T, d=4] of the integer Switch layer below: the router is the identity (logits = x), so each token
# goes to its largest entry; 6 tokens to expert 0 (more than d and than two chunks of 2), one to each other.
# 4097^2 = 16785409 needs 25 bits: a sum of squares taken in float32 cannot hold it.
TOKENS = torch.tensor([
    [4097, 1, 0, 0], [5, 2, 1, 0], [6, -3, 0, 0], [7, 1, 2, 3], [8, 0, 0, 1], [10, 4, 0, 0],  # expert 0
    [1, 3, 1, 0],  # expert 1
    [1, 2, 5, 0],  # expert 2
    [2, 1, 0, 3],  # expert 3
], dtype=torch.float32)
W_OUT = torch.tensor([[[1, 2], [0, -1], [3, 1], [-2, 0]],  # wo of expert e: W_OUT[e] [d, ff], integers
                      [[2, 0], [1, 1], [0, 3], [1, -1]],
                      [[-1, 1], [2, 2], [1, 0], [0, 4]],
                      [[3, -2], [0, 1], [1, 1], [2, 0]]], dtype=torch.float32)


def not_float32(value: float) -> bool:
    return float(torch.tensor(value, dtype=torch.float32)) != value


def integer_switch():
    """The first MoE layer of a tiny Switch model (E = 4, top-1, d = 4, ff = 2, relu) with integer weights:
    router = identity, every expert's wi picks x[0], x[1] (h = relu(x[:2])), wo = W_OUT[e]."""
    model = tiny_switch(num_experts=4, d_model=4, d_ff=2, num_layers=2)
    layer = moe_layers(model)[0]
    with torch.no_grad():
        layer.module.router.classifier.weight.copy_(torch.eye(4))
        for e in range(4):
            expert = layer.module.experts[f"expert_{e}"]
            expert.wi.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1, 0, 0]]))
            expert.wo.weight.copy_(W_OUT[e])
    return model, layer


def by_hand(tokens, keep=None):
    """Every statistic of the integer Switch layer, in float64 from the definitions (top-1 of the logits
    x, masked experts never chosen and their logits 0 in the Gram matrix)."""
    x = tokens.double()
    logits = x.clone()
    if keep is not None:
        logits[:, ~keep] = 0
        top = x.masked_fill(~keep, float("-inf")).argmax(1)
    else:
        top = x.argmax(1)
    h = x[:, :2].clamp_min(0)
    want = dict(tokens=x.shape[0], counts=torch.zeros(4, dtype=torch.float64), logit_gram=logits.T @ logits,
                feature_sum=torch.zeros(4, 4, dtype=torch.float64), slot_input_sq=torch.zeros(4, 4, dtype=torch.float64),
                slot_hidden_sq=torch.zeros(4, 2, dtype=torch.float64))
    for t, e in enumerate(top.tolist()):
        want["counts"][e] += 1
        want["feature_sum"][e] += x[t]
        want["slot_input_sq"][e] += x[t] ** 2
        want["slot_hidden_sq"][e] += h[t] ** 2
    # expert-output: every expert on every token, f_e(x) = W_OUT[e] relu(x[:2])
    want["output_sum"] = torch.stack([W_OUT[e].double() @ h.sum(0) for e in range(4)])
    return want


def assert_stats(s, want):
    assert s.tokens == want["tokens"]
    for field, value in want.items():
        if field != "tokens":
            got = getattr(s, field)
            assert got.dtype == torch.float64 and torch.equal(got, value), f"{field}: {got} != {value}"


# --- LayerStats.summary -------------------------------------------------------------------------------
def test_summary_is_tokens_selections_and_frequencies_to_six_digits():
    """The JSON saved with merged checkpoints: its keys, and each frequency rounded to 6 decimals."""
    s = LayerStats(name="l", num_experts=3, top_k=2, tokens=3, counts=torch.tensor([2.0, 4.0, 0.0], dtype=torch.float64),
                   logit_gram=torch.zeros(3, 3, dtype=torch.float64), feature_sum=torch.zeros(3, 2, dtype=torch.float64))
    assert s.summary() == {"tokens": 3, "selections": 6, "usage_frequency": [0.333333, 0.666667, 0.0]}


@pytest.mark.parametrize("collected", [False, True])
def test_to_moves_every_tensor_and_keeps_everything_else(collected):
    """`LayerStats.to` (how the --device-map statistics come back to the CPU): every tensor field on the new
    device with its values, optional fields left None when not collected, and the scalars kept."""
    gen = torch.Generator().manual_seed(3)
    f64 = dict(dtype=torch.float64)
    optional = dict(output_sum=torch.randn(3, 2, generator=gen, **f64), slot_input_sq=torch.rand(2, 2, generator=gen, **f64),
                    slot_hidden_sq=torch.rand(2, 5, generator=gen, **f64), saliency_sum=torch.rand(3, generator=gen, **f64),
                    saliency_mode="reap") if collected else {}
    s = LayerStats(name="block.7", num_experts=3, top_k=2, tokens=11, counts=torch.tensor([5.0, 6.0, 11.0], **f64),
                   logit_gram=torch.randn(3, 3, generator=gen, **f64), feature_sum=torch.randn(3, 2, generator=gen, **f64),
                   **optional)
    moved = s.to("meta")
    assert (moved.name, moved.num_experts, moved.top_k, moved.tokens) == ("block.7", 3, 2, 11)
    assert moved.saliency_mode == s.saliency_mode
    for field in ("counts", "logit_gram", "feature_sum", "output_sum", "slot_input_sq", "slot_hidden_sq", "saliency_sum"):
        before, after = getattr(s, field), getattr(moved, field)
        if before is None:
            assert after is None, field
            continue
        assert after.device.type == "meta" and after.shape == before.shape and after.dtype == before.dtype, field
        assert before.device.type == "cpu", f"{field}: the original was moved too"


# --- _Accumulator.__init__ ------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["switch", "mixtral"])
def test_accumulators_are_float64_on_the_layer_device_and_named_after_it(family):
    """Built under another default device (here meta, as torch.set_default_device would make it): every
    accumulator stays on the layer's device (the CPU), in float64, with its documented shape, and the stats
    carry the layer's name (used in their error messages)."""
    model = tiny_switch(num_experts=4, d_model=8, d_ff=6) if family == "switch" else \
        tiny_mixtral(num_experts=4, hidden_size=8, intermediate_size=6, num_layers=1)
    layer = moe_layers(model)[0]
    E, d, ff = 4, 8, 6
    S, F_in = layer.expert_weights()[0].shape[:2]
    assert F_in != S, "design: w_in's rows differ from its slots"
    with torch.device("meta"):
        acc = layer_accumulator(layer, bases=ALL_BASES, input_norms=True, saliency="reap")
    s = acc.stats
    assert s.name == layer.name
    shapes = dict(counts=(E,), logit_gram=(E, E), feature_sum=(E, d), slot_input_sq=(S, d), slot_hidden_sq=(S, ff),
                  saliency_sum=(E,))
    tensors = {field: getattr(s, field) for field in shapes}
    tensors["activation_sum"] = acc.activation_sum
    shapes["activation_sum"] = (S, ff)
    for field, t in tensors.items():
        assert (t.device.type, t.dtype, tuple(t.shape)) == ("cpu", torch.float64, shapes[field]), field
    with pytest.raises(ValueError, match=re.escape(f"{layer.name}: expert outputs were not collected")):
        layer_accumulator(layer).finish().mean_output


class _MpsAsMeta(TorchFunctionMode):
    """Factory calls asking for an "mps" device get the meta device instead (this machine has no MPS)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        device = kwargs.get("device")
        if device is not None and torch.device(device).type == "mps":
            kwargs["device"] = "meta"
        return func(*args, **kwargs)


def test_accumulators_on_mps_are_float32(monkeypatch):
    """MPS has no float64: a layer computing there gets float32 accumulators (the compute device is faked
    as mps; the tensors are made on meta)."""
    layer = moe_layers(tiny_mixtral(num_experts=4, hidden_size=8, intermediate_size=6, num_layers=1))[0]
    monkeypatch.setattr(calibrate, "compute_device", lambda module, weight: torch.device("mps"))
    with _MpsAsMeta():
        acc = layer_accumulator(layer, bases=ALL_BASES, input_norms=True, saliency="reap")
    s = acc.stats
    for t in (s.counts, s.logit_gram, s.feature_sum, s.slot_input_sq, s.slot_hidden_sq, s.saliency_sum,
              acc.activation_sum):
        assert t.dtype == torch.float32 and t.device.type == "meta"


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("offload_buffers", [False, True])
def test_an_offloaded_block_accumulates_on_its_execution_device(masked, offload_buffers):
    """accelerate's cpu_offload leaves the block's weights on meta, with hooks that name the execution
    device: the accumulator finds it through the block's hooks and gets the hand statistics. A drop-masked
    router offloaded with its buffers (offload_buffers=True) has its keep mask on meta between forwards too:
    the accumulator reads it onloaded (it used to keep the meta mask and fail at the first batch)."""
    accelerate = pytest.importorskip("accelerate")
    model, layer = integer_switch()
    keep = torch.tensor([True, True, True, False]) if masked else None
    if masked:
        install_logit_mask(layer, keep)
    accelerate.cpu_offload(model, execution_device=torch.device("cpu"), offload_buffers=offload_buffers)
    layer = moe_layers(model)[0]
    assert layer.expert_weights()[0].device.type == "meta", "design: the block is offloaded"
    acc = layer_accumulator(layer, bases=ALL_BASES, chunk_tokens=2, input_norms=True)
    acc(TOKENS[None], None)
    assert_stats(acc.finish(), by_hand(TOKENS, keep))


# --- __call__ ---------------------------------------------------------------------------------------------
def test_a_mask_of_another_shape_is_refused_with_both_shapes():
    _, layer = integer_switch()
    acc = layer_accumulator(layer)
    hidden = torch.zeros(2, 5, 4)
    with pytest.raises(ValueError, match="^" + re.escape(
            f"{layer.name}: attention mask of shape (2, 4) does not match the layer input (2, 5)") + "$"):
        acc(hidden, torch.ones(2, 4, dtype=torch.long))


def test_integer_layer_statistics_are_exact_float64_sums():
    """Counts, the logit Gram matrix, routed-input sums, per-slot sums of x^2 and h^2 (every slot, 6 tokens
    of slot 0 in chunks of 2) and the expert-output sums, all equal to the hand sums. Entries holding 4097^2
    are odd integers above 2^24: float32 logits, inputs or activations would round them."""
    _, layer = integer_switch()
    want = by_hand(TOKENS)
    assert not_float32(want["logit_gram"][0, 0].item()) and not_float32(want["slot_input_sq"][0, 0].item())
    assert not_float32(want["slot_hidden_sq"][0, 0].item())
    assert layer.expert_weights()[0].shape[1] < layer.num_experts, "design: w_in has fewer rows than slots"
    acc = layer_accumulator(layer, bases=ALL_BASES, chunk_tokens=2, input_norms=True)
    acc(TOKENS[None], torch.ones(1, TOKENS.shape[0], dtype=torch.long))
    assert_stats(acc.finish(), want)


def test_drop_masked_layer_logits_are_float64_too():
    """The drop baseline's path (a logit mask on expert 3): the Gram matrix of the masked logits (0 for
    expert 3) is summed in float64 as well; expert 3's token goes to expert 0."""
    _, layer = integer_switch()
    keep = torch.tensor([True, True, True, False])
    install_logit_mask(layer, keep)
    want = by_hand(TOKENS, keep)
    assert not_float32(want["logit_gram"][0, 0].item())
    acc = layer_accumulator(layer, bases=ALL_BASES, chunk_tokens=2, input_norms=True)
    acc(TOKENS[None], None)
    assert_stats(acc.finish(), want)


def test_a_single_token_counts_and_padding_only_counts_nothing():
    """A batch whose mask leaves one token counts that token; a batch of padding changes nothing."""
    _, layer = integer_switch()
    acc = layer_accumulator(layer, bases=ALL_BASES, input_norms=True)
    hidden = TOKENS[:3][None]  # [1, 3, 4]
    acc(hidden, torch.tensor([[0, 1, 0]]))
    acc(hidden, torch.tensor([[0, 0, 0]]))
    assert_stats(acc.finish(), by_hand(TOKENS[1:2]))


def test_activations_are_computed_in_the_weights_dtype():
    """Hidden states arriving in another dtype than the experts' (float64 here, a float32 layer) run through
    the slot as the block runs it, in the weights' dtype: h of x rounded to float32. The inputs' own
    squares are kept in full (float64)."""
    _, layer = integer_switch()
    tiny = 2.0 ** -40  # lost in float32
    x = torch.tensor([[3 + tiny, 1, 0, 0], [5, 2 + tiny, 1, 0]], dtype=torch.float64)
    acc = layer_accumulator(layer, input_norms=True)
    acc(x, None)
    s = acc.finish()
    assert torch.equal(s.slot_hidden_sq[0], torch.tensor([9.0 + 25.0, 1.0 + 4.0], dtype=torch.float64))
    assert torch.equal(s.slot_input_sq[0], (x ** 2).sum(0))


@CUDA
def test_a_mask_on_another_device_than_the_hidden_states():
    """A dispatched model's batch (mask) can sit on the GPU while a block runs on the CPU: the mask follows
    the hidden states."""
    _, layer = integer_switch()
    acc = layer_accumulator(layer)
    acc(TOKENS[None], torch.ones(1, TOKENS.shape[0], dtype=torch.long, device="cuda"))
    assert acc.finish().tokens == TOKENS.shape[0]


# --- _accumulate_input_norms ------------------------------------------------------------------------------
def test_input_norms_leave_out_masked_experts_that_only_fill_the_top_k():
    """A top-2 Mixtral layer with one expert kept (drop baseline): every token's second choice is a masked
    filler, no selection: only slot 0 gets input norms."""
    model = tiny_mixtral(num_experts=4, hidden_size=8, intermediate_size=6, num_layers=1)
    layer = moe_layers(model)[0]
    install_logit_mask(layer, [True, False, False, False])
    x = torch.randn(10, 8, generator=torch.Generator().manual_seed(0))
    acc = layer_accumulator(layer, input_norms=True)
    acc(x, None)
    s = acc.finish()
    assert s.counts.tolist() == [10.0, 0.0, 0.0, 0.0]
    torch.testing.assert_close(s.slot_input_sq[0], (x.double() ** 2).sum(0), rtol=1e-12, atol=0)
    w = layer.module.experts.gate_up_proj[0].double()  # [2 ff, d]: gate rows, then up rows
    gate, up = (x.double() @ w.T).chunk(2, dim=-1)
    torch.testing.assert_close(s.slot_hidden_sq[0], ((F.silu(gate) * up) ** 2).sum(0), rtol=1e-5, atol=1e-9)
    assert not s.slot_input_sq[1:].any() and not s.slot_hidden_sq[1:].any()


# --- _finish_output ----------------------------------------------------------------------------------------
def gpt_oss_layer():
    model = tiny_moe("gpt_oss", num_experts=4, hidden_size=8, intermediate_size=4, num_layers=1)
    return model, moe_layers(model)[0]


def test_expert_output_includes_the_expert_bias_of_every_token():
    """GPT-OSS's biased experts: the expert-output basis sums f_e(x) = down(act(gate_up x + b)) + b_down over
    every token, written here from transformers' module (its own _apply_gate)."""
    _, layer = gpt_oss_layer()
    experts = layer.module.experts
    x = torch.randn(7, 8, generator=torch.Generator().manual_seed(1))
    acc = layer_accumulator(layer, bases=ALL_BASES)
    acc(x, None)
    got = acc.finish().output_sum
    want = []
    for e in range(4):
        h = experts._apply_gate(x.double() @ experts.gate_up_proj[e].double() + experts.gate_up_proj_bias[e].double())
        want.append((h @ experts.down_proj[e].double() + experts.down_proj_bias[e].double()).sum(0))
    want = torch.stack(want)
    assert (experts.down_proj_bias.abs() > 1e-3).all(), "design: the biases matter"
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_expert_bias_times_tokens_is_float64():
    """With zero down projections every expert's output is its bias: output_sum = tokens * b_down, exact
    in float64 (3 * (1 + 2^-23) needs 25 bits)."""
    _, layer = gpt_oss_layer()
    experts = layer.module.experts
    with torch.no_grad():
        experts.down_proj.zero_()
        experts.down_proj_bias.fill_(1 + 2.0 ** -23)
    acc = layer_accumulator(layer, bases=ALL_BASES)
    acc(torch.randn(3, 8, generator=torch.Generator().manual_seed(2)), None)
    want = 3 * (1 + 2.0 ** -23)
    assert not_float32(want)
    assert torch.equal(acc.finish().output_sum, torch.full((4, 8), want, dtype=torch.float64))


def test_layer_accumulator_defaults_and_checks():
    """layer_accumulator (the streamed passes' entry): no input norms and no saliency unless asked, chunks of any
    size from 1 token, and its arguments checked with messages that name them (calibrate mutants of
    layer_accumulator 2, 6-9)."""
    _, layer = integer_switch()
    mask = torch.ones(1, TOKENS.shape[0], dtype=torch.long)
    plain = layer_accumulator(layer)
    plain(TOKENS[None], mask)
    stats = plain.finish()
    assert stats.slot_input_sq is None and stats.saliency_sum is None and stats.output_sum is None
    one = layer_accumulator(layer, bases=ALL_BASES, chunk_tokens=1, input_norms=True)
    one(TOKENS[None], mask)
    assert_stats(one.finish(), by_hand(TOKENS))
    for bad in (0, -3):
        with pytest.raises(ValueError, match=rf"^chunk_tokens must be >= 1, got {bad}$"):
            layer_accumulator(layer, chunk_tokens=bad)
    with pytest.raises(ValueError, match="saliency"):
        layer_accumulator(layer, saliency="reap-typo")


def test_llama4_input_norms_sum_each_chosen_experts_scaled_copy():
    """Llama-4's router scales the expert input by the chosen expert's sigmoid score: each chosen expert's slot sums
    (s x)^2 over its tokens, a token chosen by two experts counted in both, with its own s (computed here from the
    router weights; `_accumulate_input_norms` mutants 20-28 of the fresh run)."""
    model = tiny_moe("llama4_text")
    layer = moe_layers(model)[0]
    router = layer.module.router
    x = torch.randn(1, 9, layer.hidden_size, generator=torch.Generator().manual_seed(3))
    acc = layer_accumulator(layer, input_norms=True)
    acc(x, torch.ones(1, 9, dtype=torch.long))
    got = acc.finish().slot_input_sq
    flat = x[0].double()
    logits = flat @ router.weight.double().T + (router.bias.double() if router.bias is not None else 0)
    top_v, top_i = logits.topk(layer.top_k, dim=1)
    scores = torch.sigmoid(top_v)
    want = torch.zeros(layer.num_experts, layer.hidden_size, dtype=torch.float64)
    for t in range(flat.shape[0]):
        for j in range(layer.top_k):
            want[top_i[t, j]] += (scores[t, j] * flat[t]) ** 2
    assert layer.top_k == 2 and (want > 0).sum(1).gt(0).sum() >= 2
    torch.testing.assert_close(got.double().cpu(), want, rtol=1e-5, atol=1e-9)


# --- _Accumulator._gates: REAP saliency's routing weights ------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("mode", ["reap", "reap-softmax"])
def test_switch_saliency_is_each_tokens_expert_output_norm_by_hand(mode, dtype):
    """Switch keeps its router in the block, not on the layer: saliency_sum[e] sums g * ||W_OUT[e] relu(x[:2])||
    over the tokens routed to e, g = 1 under "reap" (top-1 renormalised) and softmax(x)[e] under "reap-softmax"
    (the integer layer: logits = x; `_gates` mutants 7, 10-15 of the fresh run)."""
    model, layer = integer_switch()
    model.to(dtype)  # float64: the expert outputs' norms of 25 bits and more are not rounded to float32
    acc = layer_accumulator(layer, saliency=mode)
    acc(TOKENS[None].to(dtype), torch.ones(1, TOKENS.shape[0], dtype=torch.long))
    got = acc.finish().saliency_sum
    x = TOKENS.double()
    probs = torch.softmax(x, dim=-1)
    want = torch.zeros(4, dtype=torch.float64)
    for t, e in enumerate(x.argmax(1).tolist()):
        g = 1.0 if mode == "reap" else probs[t, e]
        want[e] += g * (W_OUT[e].double() @ x[t, :2].clamp_min(0)).norm()
    assert (want > 0).all()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


def test_saliency_calls_a_router_taking_the_blocks_bias_as_the_block_does():
    """MiniMax-M2's sigmoid router takes the block's e_score_correction_bias: g is the router's own top-k weight
    with that bias in the choice, f_j the expert itself (transformers' experts module, one expert at a time;
    `_gates` mutants 21, 27, 28 of the fresh run called the router without it)."""
    from mcsmoe_fast.tiny_any import tiny_from_model_type

    model = tiny_from_model_type("minimax_m2")
    layer = moe_layers(model)[0]
    block = layer.module
    with torch.no_grad():
        block.e_score_correction_bias.copy_(torch.linspace(-0.5, 0.5, block.e_score_correction_bias.numel()))
    x = torch.randn(1, 10, model.config.hidden_size, generator=torch.Generator().manual_seed(4))
    acc = layer_accumulator(layer, saliency="reap")
    acc(x, None)
    got = acc.finish().saliency_sum
    flat = x[0]
    with torch.no_grad():
        _, weights, index = layer.router(flat, block.e_score_correction_bias)
        want = torch.zeros(layer.num_experts, dtype=torch.float64)
        for t in range(flat.shape[0]):
            for j, e in enumerate(index[t].tolist()):
                f = block.experts(flat[t : t + 1], torch.tensor([[e]]), torch.ones(1, 1))
                want[e] += float(weights[t, j]) * f.double().norm()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_saliency_refuses_a_router_without_top_k_weights():
    """A router that does not return (logits, top-k weights, top-k index) cannot give REAP its g: refused, naming the
    layer and the router (`_gates` mutants 29, 33, 34 of the fresh run)."""
    model = tiny_moe("deepseek_v3")
    layer = moe_layers(model)[0]
    x = torch.randn(5, layer.hidden_size, generator=torch.Generator().manual_seed(5))
    acc = layer_accumulator(layer, saliency="reap")
    routed = layer.route(x)
    logits, weights, _ = layer.router_outputs(x)
    layer.route = lambda hidden: routed  # the choice as before; only the outputs REAP reads lose the index
    layer.router_outputs = lambda hidden: (logits, weights)
    message = (rf"^{re.escape(layer.name)}: REAP saliency needs the router's top-k weights, but DeepseekV3TopkRouter "
               r"does not return \(logits, top-k weights, top-k index\)$")
    with pytest.raises(ValueError, match=message):
        acc(x[None], None)


# --- _Accumulator._accumulate_activations --------------------------------------------------------------------------
def test_expert_output_activations_are_computed_in_the_weights_dtype():
    """The expert-output basis runs every token through every slot as the block runs it, in the weights' dtype:
    float64 hidden states on a float32 layer give h of x rounded to float32 (`_accumulate_activations` mutant 11
    of the fresh run kept them in float64)."""
    _, layer = integer_switch()
    tiny = 2.0 ** -40  # lost in float32
    x = torch.tensor([[3 + tiny, 1, 0, 0], [5, 2 + tiny, 1, 0]], dtype=torch.float64)
    acc = layer_accumulator(layer, bases=ALL_BASES)
    acc(x, None)
    got = acc.finish().output_sum
    h = torch.tensor([8.0, 3.0], dtype=torch.float64)  # relu(x[:2]) summed over both tokens, in float32
    assert torch.equal(got, torch.stack([W_OUT[e].double() @ h for e in range(4)]))


# --- _Accumulator._accumulate_saliency ------------------------------------------------------------------------------
def test_saliency_of_float64_states_runs_the_experts_in_their_dtype():
    """Hidden states in float64 on a float32 layer: the experts run on the states rounded to float32, as the block
    runs them, so the saliency equals that of the rounded states (`_accumulate_saliency` mutant 40 of the fresh run
    ran them in float64)."""
    _, layer = integer_switch()
    tiny = 2.0 ** -40  # lost in float32
    x = TOKENS.double().clone()
    x[:, 0] += tiny
    assert not torch.equal(x.float().double(), x)
    runs = []
    for states in (x, x.float()):
        acc = layer_accumulator(layer, saliency="reap")
        acc(states, None)
        runs.append(acc.finish().saliency_sum)
    assert torch.equal(runs[0], runs[1])


def test_gpt_oss_saliency_includes_the_expert_biases():
    """GPT-OSS's experts carry biases: ||f_j(x)|| is the norm of the biased output, written here from transformers'
    experts module one expert at a time, g the router's own top-k weight (`_accumulate_saliency` mutant 4 of the
    fresh run dropped the biases; 82 dropped alpha and limit: this layer's are not transformers' defaults)."""
    model = tiny_moe("gpt_oss", num_experts=4, hidden_size=8, intermediate_size=4, num_layers=1, swiglu_alpha=1.1,
                     swiglu_limit=0.6)
    layer = moe_layers(model)[0]
    block = layer.module
    assert layer.activation_args == {"alpha": 1.1, "limit": 0.6}
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(6))
    acc = layer_accumulator(layer, saliency="reap")
    acc(x, None)
    got = acc.finish().saliency_sum
    want = torch.zeros(4, dtype=torch.float64)
    with torch.no_grad():
        _, weights, index = block.router(x)
        for t in range(x.shape[0]):
            for j, e in enumerate(index[t].tolist()):
                f = block.experts(x[t : t + 1], torch.tensor([[e]]), torch.ones(1, 1))
                want[e] += float(weights[t, j]) * f.double().norm()
    assert (block.experts.down_proj_bias.abs() > 1e-3).all(), "design: the biases matter"
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_llama4_saliency_runs_each_chosen_expert_on_its_scaled_input():
    """Llama-4's router scales the expert input by the chosen expert's sigmoid score s: the contribution is
    ||f_j(s x)|| with g = 1, f_j from transformers' experts module, s from the router weights
    (`_accumulate_saliency` mutants 43-52 of the fresh run)."""
    model = tiny_moe("llama4_text")
    layer = moe_layers(model)[0]
    router, experts = layer.module.router, layer.module.experts
    x = torch.randn(1, 7, layer.hidden_size, generator=torch.Generator().manual_seed(7))
    acc = layer_accumulator(layer, saliency="reap")
    acc(x, None)
    got = acc.finish().saliency_sum
    flat = x[0]
    with torch.no_grad():
        logits = flat @ router.weight.T + (router.bias if router.bias is not None else 0)
        top_v, top_i = logits.topk(layer.top_k, dim=1)
        want = torch.zeros(layer.num_experts, dtype=torch.float64)
        for t in range(flat.shape[0]):
            for j, e in enumerate(top_i[t].tolist()):
                rows = torch.zeros(layer.num_experts, layer.hidden_size)
                rows[e] = torch.sigmoid(top_v[t, j]) * flat[t]  # [E, 1, d] as the module views it: expert e's row
                want[e] += experts(rows)[e].double().norm()
    assert layer.top_k == 2
    torch.testing.assert_close(got.double().cpu(), want, rtol=1e-5, atol=1e-7)


# --- collect_routing_stats -------------------------------------------------------------------------------------------
def mixtral_batches():
    ids = torch.randint(3, 100, (2, 6), generator=torch.Generator().manual_seed(8))
    return [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]


def test_collect_routing_stats_shows_a_titled_bar_unless_told_not_to(capsys):
    """A progress bar titled "routing statistics" by default, none with progress=False (collect_routing_stats
    mutants 2, 28, 33, 39-42 of the fresh run)."""
    model = tiny_mixtral(num_experts=4, hidden_size=8, intermediate_size=8, num_layers=1)  # 16-byte strides
    calibrate.collect_routing_stats(model, mixtral_batches())
    assert re.search(r"routing statistics: .*1/1", capsys.readouterr().err)
    calibrate.collect_routing_stats(model, mixtral_batches(), progress=False)
    assert capsys.readouterr().err == ""


def test_collect_routing_stats_checks_its_chunks_and_batches():
    """Chunks from 1 token give the same statistics as the default; 0 and an empty batch list are refused with
    messages that name them (collect_routing_stats mutants 7-9, 46 of the fresh run)."""
    model = tiny_mixtral(num_experts=4, hidden_size=8, intermediate_size=8, num_layers=1)
    bases = ALL_BASES
    one = calibrate.collect_routing_stats(model, mixtral_batches(), bases=bases, chunk_tokens=1, progress=False)
    default = calibrate.collect_routing_stats(model, mixtral_batches(), bases=bases, progress=False)
    for name, s in default.items():
        torch.testing.assert_close(one[name].output_sum, s.output_sum, rtol=1e-5, atol=1e-7)  # float32 chunk sums
    with pytest.raises(ValueError, match=r"^chunk_tokens must be >= 1, got 0$"):
        calibrate.collect_routing_stats(model, mixtral_batches(), chunk_tokens=0, progress=False)
    with pytest.raises(ValueError, match=r"^batches: no calibration batch was given$"):
        calibrate.collect_routing_stats(model, [], progress=False)


def test_an_unknown_basis_is_named_with_the_choices():
    with pytest.raises(ValueError, match=r"^bases: unknown similarity basis \['logits'\]; choose from router-logits, "
                                         r"router-weight, weight, feature, expert-output, random$"):
        layer_accumulator(integer_switch()[1], bases=("logits",))
