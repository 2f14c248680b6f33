"""Expert permutation alignment: function preserved, permutations recovered, references honoured."""
import copy

import pytest
import torch

from mcsmoe_fast import align_experts, moe_layers
from mcsmoe_fast.models.hub import load_model
from mcsmoe_fast.permute import apply_permutation, apply_permutation_, match_permutations, weight_matching_cost
from mcsmoe_fast.tiny import tiny_mixtral, tiny_switch


def model_inputs(model, seed=0, batch=2, length=11):
    ids = torch.randint(2, model.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))
    if model.config.model_type == "switch_transformers":
        return {"input_ids": ids, "decoder_input_ids": ids[:, :7]}
    return {"input_ids": ids}


@pytest.fixture(params=["switch", "mixtral"])
def saved_model(request, tmp_path):
    model = tiny_switch() if request.param == "switch" else tiny_mixtral(num_experts=6, intermediate_size=48)
    model.save_pretrained(tmp_path / "model")
    return tmp_path / "model"


@pytest.mark.parametrize("strategy", ["weight", "activation"])
def test_align_preserves_function(saved_model, strategy):
    model = load_model(str(saved_model))
    inputs = model_inputs(model)
    with torch.no_grad():
        before = model(**inputs).logits
    perms = align_experts(model, strategy=strategy, batches=[inputs], progress=False)
    with torch.no_grad():
        after = model(**inputs).logits
    assert (after - before).abs().max() <= 1e-5
    layers = moe_layers(model)
    assert set(perms) == {layer.name for layer in layers}
    for layer in layers:
        perm = perms[layer.name]
        assert torch.equal(perm[0], torch.arange(perm.shape[1])), "the reference expert must not move"
        assert torch.equal(perm.sort(1).values, torch.arange(perm.shape[1]).expand_as(perm)), "rows must be permutations"
        assert (perm[1:] != torch.arange(perm.shape[1])).any(), "random experts should need reordering"


def plain_permuted(w_in, w_out, order, activation):
    """Expert (w_in [F, d], w_out [d, ff]) whose hidden neuron a is old neuron order[a], by plain indexing:
    rows of w_in (gate rows and up rows alike for SwiGLU) and the matching columns of w_out."""
    ff = w_out.shape[-1]
    rows = torch.cat([order, order + ff]) if activation == "swiglu" else order
    return w_in[rows], w_out[:, order]


@pytest.mark.parametrize("activation,ff", [("relu", 37), ("swiglu", 29)])
def test_recovers_a_hidden_permutation(activation, ff):
    """Expert 1 is expert 0 with its neurons shuffled (plus noise): alignment must undo the shuffle.
    The shuffled expert is built, and the result checked, by plain indexing (not by apply_permutation)."""
    g = torch.Generator().manual_seed(ff)
    d = 19
    f = 2 * ff if activation == "swiglu" else ff
    w_in0, w_out0 = torch.randn(f, d, generator=g), torch.randn(d, ff, generator=g)
    shuffle = torch.randperm(ff, generator=g)
    w_in1, w_out1 = plain_permuted(w_in0, w_out0, shuffle, activation)
    w_in = torch.stack([w_in0, w_in1 + 0.01 * torch.randn(f, d, generator=g)])
    w_out = torch.stack([w_out0, w_out1 + 0.01 * torch.randn(d, ff, generator=g)])
    perm = match_permutations(w_in, w_out, torch.tensor([0, 0]), activation)
    assert torch.equal(perm[0], torch.arange(ff))
    assert torch.equal(shuffle[perm[1]], torch.arange(ff))  # new neuron a of expert 1 is old neuron perm[1, a]
    aligned_in, aligned_out = plain_permuted(w_in[1], w_out[1], perm[1], activation)
    assert (aligned_in - w_in0).abs().max() < 0.1
    assert (aligned_out - w_out0).abs().max() < 0.1


@pytest.mark.parametrize("activation", ["relu", "swiglu"])
def test_apply_permutation_is_plain_indexing(activation):
    g = torch.Generator().manual_seed(3)
    s, d, ff = 3, 5, 7
    f = 2 * ff if activation == "swiglu" else ff
    w_in, w_out = torch.randn(s, f, d, generator=g), torch.randn(s, d, ff, generator=g)
    perm = torch.stack([torch.randperm(ff, generator=g) for _ in range(s)])
    perm[1] = torch.arange(ff)  # an identity row too
    new_in, new_out = apply_permutation(w_in, w_out, perm, activation)
    for e in range(s):
        exp_in, exp_out = plain_permuted(w_in[e], w_out[e], perm[e], activation)
        assert torch.equal(new_in[e], exp_in) and torch.equal(new_out[e], exp_out)
    same_in, same_out = w_in.clone(), w_out.clone()
    ptr = same_in.data_ptr()
    got_in, got_out = apply_permutation_(same_in, same_out, perm, activation)  # in place: same result
    assert got_in.data_ptr() == ptr and torch.equal(got_in, new_in) and torch.equal(got_out, new_out)


def test_cost_matches_plain_dot_products():
    w_in, w_out = torch.randn(3, 10, 4), torch.randn(3, 4, 5)  # swiglu: ff = 5
    cost = weight_matching_cost(w_in, w_out, torch.tensor([1, 2]), torch.tensor([0, 0]), "swiglu")
    for t, target in enumerate([1, 2]):
        for a in range(5):
            for b in range(5):
                expected = (w_in[0, a] @ w_in[target, b] + w_in[0, 5 + a] @ w_in[target, 5 + b]
                            + w_out[0, :, a] @ w_out[target, :, b])
                assert torch.allclose(cost[t, a, b], expected, atol=1e-5)


def test_alignment_raises_similarity_to_reference():
    model = tiny_mixtral(num_experts=4, intermediate_size=64)
    layer = moe_layers(model)[0]
    w_in, w_out = (w.detach().clone() for w in layer.expert_weights())

    def score(a, b):
        return (a[0] * a[1:]).sum((1, 2)) + (b[0] * b[1:]).sum((1, 2))

    before = score(w_in, w_out)
    align_experts(model, progress=False)
    after = score(*layer.expert_weights())
    assert (after >= before - 1e-4).all() and (after > before).any()


def test_per_expert_references_and_chunking():
    """One expert a chunk (memory_budget=1) finds every permutation a single chunk finds; references keep theirs."""
    model = tiny_switch(num_experts=6)
    refs = [[0, 0, 2, 2, 2, 0]] * len(moe_layers(model))
    whole = align_experts(copy.deepcopy(model), reference=refs, progress=False)
    perms = align_experts(model, reference=refs, memory_budget=1, progress=False)
    assert perms.keys() == whole.keys()
    for name, perm in perms.items():
        identity = torch.arange(perm.shape[1])
        assert torch.equal(perm[0], identity) and torch.equal(perm[2], identity)
        assert torch.equal(perm, whole[name])
        moved = [e for e in (1, 3, 4, 5) if not torch.equal(perm[e], identity)]
        assert moved, f"{name}: no non-reference expert was permuted, the test cannot see a skipped chunk"


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"reference": 99}, "out of range"),
        ({"reference": [0]}, "one entry per MoE layer"),
        ({"reference": [[1, 2, 0, 0, 0, 0, 0, 0]] * 4}, "its own reference"),
        ({"strategy": "gradient"}, "strategy"),
        ({"strategy": "activation"}, "calibration"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        align_experts(tiny_switch(), progress=False, **kwargs)


def test_unsupported_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2))
    with pytest.raises(ValueError, match="no MoE layer mcsmoe_fast can handle in this 'llama' model"):
        align_experts(model, progress=False)


def test_cli_permute(saved_model, tmp_path, capsys):
    from mcsmoe_fast.cli import main

    out = tmp_path / "aligned"
    assert main(["permute", "--model", str(saved_model), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "neurons moved" in printed and "aligned" in printed
    original, aligned = load_model(str(saved_model)), load_model(str(out))
    inputs = model_inputs(original, seed=3)
    with torch.no_grad():
        assert (original(**inputs).logits - aligned(**inputs).logits).abs().max() <= 1e-5
    w0 = moe_layers(original)[0].expert_weights()[0]
    w1 = moe_layers(aligned)[0].expert_weights()[0]
    assert not torch.equal(w0, w1)


def test_cli_missing_model(tmp_path, capsys):
    from mcsmoe_fast.cli import main

    assert main(["permute", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "error" in capsys.readouterr().err


def test_activation_strategy_on_switch_with_ordinary_calibration_batches(tmp_path):
    """input_ids + attention_mask only (no decoder inputs): the decoder reads the input text; each layer
    keeps its own side's tokens: encoder layers the attention_mask's, decoder layers the labels' mask."""
    from mcsmoe_fast.permute import _layer_inputs

    tiny_switch().save_pretrained(tmp_path / "m")
    model = load_model(str(tmp_path / "m"))
    ids = torch.randint(2, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, 4:] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    with torch.no_grad():
        before = model(**batch, decoder_input_ids=ids).logits
    align_experts(model, strategy="activation", batches=[batch], progress=False)
    with torch.no_grad():
        assert (model(**batch, decoder_input_ids=ids).logits - before).abs().max() <= 1e-5

    labels = torch.full((2, 5), -100)
    labels[0, :2] = 7
    labels[1, :3] = 8  # 5 target tokens in all, against 13 unpadded input tokens
    layers = moe_layers(model)
    for b, expected in (({**batch}, {"encoder": 13, "decoder": 13}), ({**batch, "labels": labels}, {"encoder": 13, "decoder": 5})):
        counts = {name: x.shape[0] for name, x in _layer_inputs(model, layers, [b], 4096).items()}
        for name, n in counts.items():
            assert n == expected["decoder" if name.startswith("decoder.") else "encoder"], (name, counts)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_named_by_layer_and_expert(value, tmp_path):
    """A NaN / inf expert weight: the error names the layer and the expert (it said "problem 0", the position in
    the solver's chunk, and no layer), for align_experts and merge_experts alike."""
    import mcsmoe_fast as mf

    model = tiny_mixtral(seed=0)
    stats = mf.collect_routing_stats(model, [dict(model_inputs(model))], progress=False)
    layer = moe_layers(model)[1]
    with torch.no_grad():
        layer.module.experts.gate_up_proj[3, 0, 0] = value
    with pytest.raises(ValueError, match=rf"{layer.name}: aligning expert 3 to expert 0 needs finite weights"):
        align_experts(model, reference=0, progress=False)
    with pytest.raises(ValueError, match=rf"{layer.name}: aligning expert \d to expert \d needs finite weights"):
        mf.merge_experts(model, stats, 1, globally=False, layers=[1], progress=False)


@pytest.mark.parametrize("budget", [0, -5, 2.5, True, "1GB"])
def test_a_memory_budget_below_one_byte_or_not_a_number_is_refused(budget):
    model = tiny_switch(num_experts=4)
    with pytest.raises(ValueError, match=f"memory_budget must be a whole number of bytes >= 1, got {budget!r}"):
        align_experts(model, memory_budget=budget, progress=False)


@pytest.mark.parametrize("max_tokens", [0, 1, 2.0, None])
def test_activation_matching_refuses_fewer_than_two_tokens_up_front(max_tokens):
    model = tiny_switch(num_experts=4)
    with pytest.raises(ValueError, match=f"max_tokens must be a whole number >= 2.*got {max_tokens!r}"):
        align_experts(model, strategy="activation", batches=[], max_tokens=max_tokens, progress=False)
