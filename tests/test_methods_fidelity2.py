"""The field's methods against their definitions (second audit): REAP saliency on every softmax router the package
runs, whatever its class name (docs/methods.md, calibrate.py); `compare` on an encoder-decoder model refused before
any work; calibration batches given as an iterator serve every pass of a comparison, and the fitted standard router
refuses a layer no calibration token reached."""
from __future__ import annotations

import itertools

import pytest
import torch

import mcsmoe_fast.compare as compare
import mcsmoe_fast.compare_streamed as compare_streamed
from mcsmoe_fast import collect_routing_stats
from mcsmoe_fast.calibrate import SALIENCY_MODES, layer_accumulator
from mcsmoe_fast.checkpoint import to_standard
from mcsmoe_fast.compress import CompressOptions
from mcsmoe_fast.models import moe_layers
from mcsmoe_fast.tiny import tiny_mixtral, tiny_moe, tiny_switch
from mcsmoe_fast.tiny_any import tiny_from_model_type
from test_contract_families import BUILDER_LIMITS, contract_model_types

# the contract families whose routers weigh their chosen experts by the softmax of their logits (transformers'
# modeling files): renormalised over the chosen experts, or the plain probabilities
RENORMALISED = ("mixtral", "gpt_oss", "qwen3_next", "qwen3_5_moe_text", "qwen3_vl_moe_text", "minimax", "cohere2_moe",
                "ernie4_5_moe", "granitemoe", "granitemoe_swa", "granitemoeshared", "aria_text", "mistral4",
                "mistral_large4_text", "mellum", "lara_mini", "hunyuan_v1_moe")
PLAIN = ("qwen2_moe", "qwen3_moe", "olmoe", "flex_olmo", "jamba", "deepseek_v2")


def ids(seed, shape=(2, 12)):
    return torch.randint(3, 128, shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def randomise_routers(layers) -> None:
    """Random router rows: some tiny builds leave the router at zeros (FlexOlmo), every expert tied."""
    generator = torch.Generator().manual_seed(1)
    for layer in layers:
        for p in layer.router.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.5, generator=generator)


@torch.no_grad()
def reap_reference(model, batch):
    """({layer: {mode: saliency [E]}}, the set of layers whose router is a softmax, {layer: its tokens [T, d]}) in a
    plain forward of `batch` (no padding), the saliency from REAP's definition (eq. 9): the mean over the tokens
    routed to j of g_j(x) ||f_j(x)||, f_j the family's own experts module, g the softmax probability of the router's
    logits (renormalised over the chosen experts for "reap", plain for "reap-softmax") where the router's top-k
    weights are that softmax, plain or renormalised, and the router's own top-k weights otherwise."""
    saliency, softmax, inputs, hooks = {}, set(), {}, []
    for layer in moe_layers(model):
        def record(router, args, out, layer=layer):
            x = inputs[layer.name] = args[0].reshape(-1, args[0].shape[-1])
            logits, weights, index = out[0].double(), out[1].double(), out[2].long()
            p = torch.softmax(logits, -1).gather(1, index)
            renormalised = p / p.sum(-1, keepdim=True)
            is_softmax = torch.allclose(weights, p, atol=1e-5) or torch.allclose(weights, renormalised, atol=1e-5)
            gates = {"reap": renormalised, "reap-softmax": p} if is_softmax else dict.fromkeys(SALIENCY_MODES, weights)
            softmax.update([layer.name] if is_softmax else [])
            ones = torch.ones(x.shape[0], 1)
            norms = torch.stack([layer.module.experts(x, index[:, j:j + 1], ones).double().norm(dim=-1)
                                 for j in range(index.shape[1])], dim=1)  # ||f_j(x)|| of each token's j-th choice
            counts = torch.bincount(index.reshape(-1), minlength=layer.num_experts).double()
            zeros = torch.zeros(layer.num_experts, dtype=torch.float64)
            saliency[layer.name] = {mode: zeros.index_add(0, index.reshape(-1), (g * norms).reshape(-1))
                                    / counts.clamp_min(1) for mode, g in gates.items()}
        hooks.append(layer.router.register_forward_hook(record))
    try:
        model(**batch)
    finally:
        for hook in hooks:
            hook.remove()
    return saliency, softmax, inputs


def test_reap_saliency_follows_the_definition_on_every_contract_family():
    """Every family on the experts contract that the package runs: REAP saliency in both modes (the accumulators
    collect_routing_stats hooks, on each MoE block's tokens) equals the definition, so a softmax router gets the
    softmax probability (renormalised under "reap") whatever its class is called (FlexOlmo, Jamba, DeepSeek-V2,
    Qwen3-VL-MoE, ... were taken for sigmoid routers by a list of names), and any other router its own top-k
    weights."""
    batch = {"input_ids": ids(0), "attention_mask": torch.ones(2, 12, dtype=torch.long)}
    softmax_families, wrong = set(), []
    for model_type in contract_model_types():
        if model_type in BUILDER_LIMITS:
            continue
        try:
            model = tiny_from_model_type(model_type, seed=0)
            layers = moe_layers(model)
        except (ValueError, TypeError, AttributeError):  # refused, composite or no experts: the contract walk's cases
            continue
        randomise_routers(layers)
        want, softmax, inputs = reap_reference(model, batch)
        if softmax:
            softmax_families.add(model_type)
        for mode, layer in itertools.product(SALIENCY_MODES, layers):  # collect_routing_stats' accumulators
            accumulate = layer_accumulator(layer, saliency=mode)
            accumulate(inputs[layer.name], None)
            got, ref = accumulate.finish().saliency.double(), want[layer.name][mode]
            if not torch.allclose(got, ref, rtol=1e-4, atol=1e-6 * float(ref.abs().max())):
                err = float((got - ref).abs().max() / ref.abs().max())
                wrong.append(f"{model_type} {layer.name} {mode}: {err:.3g} off")
    assert not wrong, "REAP saliency differs from its definition: " + "; ".join(wrong)
    assert set(RENORMALISED + PLAIN) <= softmax_families, set(RENORMALISED + PLAIN) - softmax_families


def test_reap_and_reap_softmax_differ_on_a_plain_softmax_router_of_any_name():
    """FlexOlmo (OLMoE's router under another name, weights not renormalised): "reap" renormalises the softmax over
    the chosen experts, "reap-softmax" keeps the plain probability; the two keep different numbers."""
    model = tiny_from_model_type("flex_olmo", seed=0)
    randomise_routers(moe_layers(model))
    batch = {"input_ids": ids(0)}
    reap, plain = (collect_routing_stats(model, [batch], saliency=m, progress=False) for m in SALIENCY_MODES)
    want, softmax, _ = reap_reference(model, batch)
    assert softmax == set(want)
    for name in reap:
        torch.testing.assert_close(reap[name].saliency.double(), want[name]["reap"], rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(plain[name].saliency.double(), want[name]["reap-softmax"], rtol=1e-5, atol=1e-9)
        assert not torch.allclose(reap[name].saliency, plain[name].saliency)


# --- compare on an encoder-decoder model -------------------------------------------------------------------------
def encoder_decoder(what: str) -> str:
    """The refusal's pattern, `what` naming the model."""
    return (r"^compare measures perplexity on text windows \(causal LMs\); " + what + r" is an encoder-decoder model: "
            r"merge it with `mcsmoe-fast merge` and evaluate the merges with `mcsmoe-fast eval --task \.\.\.`$")


def test_compare_refuses_an_encoder_decoder_before_the_statistics_pass(monkeypatch):
    """Switch: compare measures causal-LM perplexity, which an encoder-decoder has not; refused in check_feasible,
    before the statistics pass (it used to run the whole pass, then fail naming a --task compare does not have)."""
    def fail(*args, **kwargs):
        raise AssertionError("the statistics pass ran before the refusal")
    monkeypatch.setattr(compare, "collect_routing_stats", fail)
    model = tiny_switch(num_experts=8, num_layers=2)
    batch = {"input_ids": ids(0), "attention_mask": torch.ones(2, 12, dtype=torch.long), "decoder_input_ids": ids(0)}
    with pytest.raises(ValueError, match=encoder_decoder("SwitchTransformersForConditionalGeneration")):
        compare.compare_methods(model, [batch], ids(1, (2, 8)), ["reap"], (0.5,), progress=False)


def test_compare_larger_than_memory_refuses_an_encoder_decoder_by_what_it_is(tmp_path):
    """The streamed comparison's refusal of a Switch checkpoint names the reason (an encoder-decoder), never
    pointing to the in-memory comparison, which cannot run it either."""
    tiny_switch(num_experts=8, num_layers=2).save_pretrained(tmp_path / "switch")
    with pytest.raises(ValueError, match=encoder_decoder(r"the 'switch_transformers' model at .*/switch")):
        compare_streamed.check_checkpoint(tmp_path / "switch", ["reap"], [0.5])


# --- calibration batches given as an iterator ---------------------------------------------------------------------
def _batches():
    return [{"input_ids": ids(s), "attention_mask": torch.ones(2, 12, dtype=torch.long)} for s in (2, 3)]


def test_compare_takes_the_calibration_batches_as_an_iterator():
    """collect_routing_stats takes any iterable: compare_methods given an iterator gives the rows it gives for the
    list (the statistics pass used it up, and m-smoe-standard's router rows were then the dominant ones; the
    compressed merge's activation importance found no batch)."""
    model = tiny_moe("mixtral", num_experts=8, top_k=2, seed=0)
    windows = ids(4, (3, 10))
    methods = ["m-smoe-standard", "m-smoe+c"]
    options = CompressOptions(rank=4, keep_ratio=0.3, importance="activation")
    want = compare.compare_methods(model, _batches(), windows, methods, (0.5,), progress=False, compress=options)
    got = compare.compare_methods(model, iter(_batches()), windows, methods, (0.5,), progress=False, compress=options)
    assert [r["perplexity"] for r in got["rows"]] == [r["perplexity"] for r in want["rows"]]


def test_compare_larger_than_memory_takes_the_calibration_batches_as_an_iterator(tmp_path):
    """compare_checkpoint runs one statistics pass per method: an iterator serves each of them, as the list does."""
    tiny_mixtral(seed=3).save_pretrained(tmp_path / "model")
    windows = ids(4, (3, 10))
    methods = ["reap", "m-smoe-standard"]
    kw = dict(scratch=tmp_path / "scratch", max_memory="1KB", progress=False)
    want = compare_streamed.compare_checkpoint(tmp_path / "model", _batches(), windows, methods, (0.5,), **kw)
    got = compare_streamed.compare_checkpoint(tmp_path / "model", iter(_batches()), windows, methods, (0.5,), **kw)
    assert [r["perplexity"] for r in got["rows"]] == [r["perplexity"] for r in want["rows"]]


def test_fitted_standard_router_refuses_a_layer_no_token_reached():
    """router='fitted' with no calibration token (empty or used-up batches) is refused, naming the layer, never
    given the dominant rows under the name of fitted ones."""
    model = tiny_moe("mixtral", num_experts=8, top_k=2, seed=0)
    stats = collect_routing_stats(model, _batches(), progress=False)
    merged = compare.merged_model(model, stats, "m-smoe", 4)
    first = moe_layers(merged)[0].name
    message = (rf"^router='fitted': no calibration token reached layer {first} \(empty or used-up batches: an "
               r"iterator serves one pass only\); pass the calibration batches as a list, or router='dominant'$")
    with pytest.raises(ValueError, match=message):
        to_standard(merged, router="fitted", batches=[])


def test_fitted_standard_router_refuses_batches_that_are_all_padding():
    """All-padding batches reach every layer with no token ([0, d]): the fitted rows would be the dominant ones."""
    model = tiny_moe("mixtral", num_experts=8, top_k=2, seed=0)
    stats = collect_routing_stats(model, _batches(), progress=False)
    merged = compare.merged_model(model, stats, "m-smoe", 4)
    padding = [{"input_ids": torch.full((2, 5), 3), "attention_mask": torch.zeros(2, 5, dtype=torch.long)}]
    with pytest.raises(ValueError, match="router='fitted': no calibration token reached layer"):
        to_standard(merged, router="fitted", batches=padding)


def test_cli_compare_refuses_an_encoder_decoder_before_reading_anything_else(tmp_path, capsys):
    """The CLI refuses a Switch checkpoint before its tokenizer, the evaluation text or the model are read: this
    directory has no tokenizer and the evaluation text does not exist, and the refusal is still the reason."""
    from mcsmoe_fast.cli import main

    tiny_switch(num_experts=8, num_layers=2).save_pretrained(tmp_path / "switch")
    (tmp_path / "calib.txt").write_text("some text\n" * 4)
    rc = main(["compare", "--model", str(tmp_path / "switch"), "--calib", str(tmp_path / "calib.txt"),
               "--eval-text", str(tmp_path / "missing.txt"), "--methods", "reap", "--ratios", "0.5",
               "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "is an encoder-decoder model" in err, err


def test_empty_tensors_are_not_recorded_as_ties():
    """Every empty tensor's storage is at address 0: a compressed layer keeping no sparse rows listed each of its
    empty tensors as an alias of the first one (config.json claimed ties that do not exist)."""
    from mcsmoe_fast.checkpoint.format import unique_tensors

    shared = torch.randn(3, 4)
    state = {"a": torch.empty(0, 4), "b": torch.empty(0, 4), "c": shared, "d": shared}
    kept, aliases = unique_tensors(state)
    assert aliases == {"d": "c"} and set(kept) == {"a", "b", "c"}


def test_streamed_fitted_router_refuses_batches_that_are_all_padding(tmp_path):
    """The streamed merge's fitted rows, as to_standard's: all-padding batches reach no layer with a token (refused
    by the statistics pass already, before any fitting)."""
    from mcsmoe_fast.streaming import merge_checkpoint

    tiny_moe("mixtral", num_layers=2).save_pretrained(tmp_path / "m")
    padding = [{"input_ids": torch.full((2, 5), 3), "attention_mask": torch.zeros(2, 5, dtype=torch.long)}]
    with pytest.raises(ValueError, match=r"no calibration token reached MoE layers \['model.layers.0.mlp'\]"):
        merge_checkpoint(tmp_path / "m", tmp_path / "out", padding, 4, format="standard", router="fitted",
                         progress=False)
    assert not (tmp_path / "out").exists()
