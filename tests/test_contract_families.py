"""Every model type of the installed transformers whose model class uses the experts contract
(`use_experts_implementation`), found by walking transformers' own registry (CONFIG_MAPPING_NAMES), never a
hand-kept list: a new transformers release shows here what it added.

Each is built tiny from its config class's defaults (mcsmoe_fast.tiny_any) and taken through every step
against its own eager experts: alignment (logits kept), routing statistics (the experts the block chooses),
merging (all groups: the same model; fewer: saved, reloaded, exported dense and loaded by vanilla
transformers, compressed), and optimize. A family either passes every step, or every step refuses it before
any work, with a message naming one of the known reasons (REASONS); anything else fails.
"""
from __future__ import annotations

import copy
import importlib.util
import re
from functools import lru_cache

import pytest
import torch
import transformers
from transformers.models.auto.configuration_auto import CONFIG_MAPPING, CONFIG_MAPPING_NAMES, model_type_to_module_name

import mcsmoe_fast as mf
from mcsmoe_fast.models import moe_layers
from mcsmoe_fast.modules import MoEExperts
from mcsmoe_fast.modules.experts_spec import follows_contract
from mcsmoe_fast.tiny_any import model_class_of, tiny_config, tiny_from_model_type

# why a family is refused: the words each refusal must carry (a refusal naming none of them fails)
REASONS = {
    "router is not a Linear scoring the block's input": r"router",
    "expert function the fused op lacks": r"expert function .* is not supported by mcsmoe_fast's fused ops",
    "post-expert norm": r"post-expert norm",
    "no experts module in this model class": r"holds no experts module",
}
# the families refused on the supported transformers (5.24 and 5.25), and why: a family refused that is not here
# (a known family newly refused, or a new one), or one here accepted, fails, and the table is updated on purpose
ROUTER, FUNCTION, POST_NORM, NO_EXPERTS = REASONS
EXPECTED_REFUSALS = {
    "deepseek_v4": ROUTER, "gemma4_text": ROUTER, "inkling_text": ROUTER, "longcat_flash": ROUTER, "zaya": ROUTER,
    "glm5_next_text": FUNCTION, "hy_v4": FUNCTION, "hy_v4_vl_text": FUNCTION, "inkling2_loop_text": FUNCTION,
    "inkling2_text": FUNCTION,
    "ergo": POST_NORM, "muse_spark_text": POST_NORM,
    **dict.fromkeys(["gemma4_audio", "gemma4_vision", "glm4v_moe_vision", "glm5_next_vision", "hy_v4_vl_vision",
                     "inkling2_vision", "muse_spark_vision", "qwen3_5_moe_vision", "qwen3_vl_moe_vision",
                     "qwen4_exp_vision"], NO_EXPERTS),
}
# configs the generic shrinking cannot build or run at tiny sizes (a builder limit, not a family outcome):
# reported as expected failures, never skipped in silence
BUILDER_LIMITS = {
    "lfm2_moe": "its config derives no layer_types (the checkpoints give them)",
    "qwen4_exp_text": "its indexer's token budget is unset in the default config",
    "kolibri1_1": "its index_layers list names layers past a tiny model",
    "dots3_note_text": "per-layer attention sizes the shrinking does not reach",
    "glm4v_moe_text": "the modeling file's default mrope sections assume the full head size",
    "granitemoehybrid": "its default layer_types hold no attention layer, which transformers' forward needs",
    "muse_spark_audio": "its per-stage lists (patch_sizes, hidden_sizes, depths) must match the layer count the "
                        "shrinking changes",
}


def _uses_contract(model_type: str) -> bool:
    """transformers' own test, on the modeling source (no model class imported: the walk stays quick)."""
    module = model_type_to_module_name(model_type)
    spec = importlib.util.find_spec(f"transformers.models.{module}.modeling_{module}")
    if spec is None or spec.origin is None:
        return False
    with open(spec.origin, encoding="utf-8") as f:
        return "@use_experts_implementation" in f.read()


@lru_cache(maxsize=None)
def contract_model_types() -> tuple[str, ...]:
    """Model types with a causal-LM or base model class (what a user loads by type) on the contract."""
    return tuple(t for t in CONFIG_MAPPING_NAMES if _uses_contract(t) and model_class_of(t) is not None)


def _is_composite(model_type: str) -> bool:
    return "text_config" in CONFIG_MAPPING[model_type]().to_dict()


TYPES = contract_model_types()


def ids(seed=0):
    return torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(seed))


def batches():
    return [{"input_ids": ids(s)} for s in range(3)]


@torch.no_grad()
def out(model, seed=0):
    result = model(input_ids=ids(seed))
    return result.logits if getattr(result, "logits", None) is not None else result.last_hidden_state


def close(a, b, tol=1e-5):
    assert a.shape == b.shape
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)


def reason_of(message: str) -> str:
    for reason, pattern in REASONS.items():
        if re.search(pattern, message):
            return reason
    raise AssertionError(f"refused for no known reason: {message}")


class Case:
    """One model type: its tiny model and what moe_layers says of it."""

    def __init__(self, model_type: str):
        self.model_type = model_type
        try:
            with torch.device("meta"):  # no memory: does this class hold experts at all (MoE switches on)?
                default = model_class_of(model_type)(tiny_config(model_type))
            self.has_experts = any(follows_contract(m) for m in default.modules())
        except Exception:  # a default config that does not build (sizes left unset): the tiny one tells
            default, self.has_experts = None, True
        self.model = tiny_from_model_type(model_type) if self.has_experts else default
        self.state = {k: v.clone() for k, v in self.model.state_dict().items()}
        try:
            self.layers = moe_layers(self.model)
            self.refusal = None
        except ValueError as exc:
            self.layers, self.refusal = [], str(exc)
        self.reference = out(self.model) if self.refusal is None else None

    def fresh(self):
        return copy.deepcopy(self.model)

    def assert_untouched(self, model):
        state = model.state_dict()
        assert sorted(state) == sorted(self.state)
        for k, v in self.state.items():
            assert torch.equal(state[k], v), k


@pytest.fixture(scope="module", params=TYPES)
def case(request):
    model_type = request.param
    if model_type in BUILDER_LIMITS:
        pytest.xfail(f"{model_type}: {BUILDER_LIMITS[model_type]}")
    if _is_composite(model_type):  # its text part is a model type of its own, walked too
        text_type = CONFIG_MAPPING[model_type]().text_config.model_type
        assert text_type in TYPES or text_type in CONFIG_MAPPING_NAMES, text_type
        pytest.skip(f"{model_type} is multimodal: its text model {text_type!r} is tested under its own type")
    return Case(model_type)


def refuses(case: Case, step, *args, **kwargs) -> bool:
    """When the family is refused: the step refuses too, for the same reason, before any work."""
    if case.refusal is None:
        return False
    if not case.has_experts:  # a vision or audio part: moe_layers said so (no forward without its inputs)
        return True
    model = case.fresh()
    with pytest.raises(ValueError) as info:
        step(model, *args, **kwargs)
    assert reason_of(str(info.value)) == reason_of(case.refusal)
    case.assert_untouched(model)
    return True


def test_walk_finds_the_contract_families():
    assert len(TYPES) > 50 and {"mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss"} <= set(TYPES)


def test_layers_found_or_refused_with_the_reason(case):
    expected = EXPECTED_REFUSALS.get(case.model_type)
    if case.refusal is None:
        assert expected is None, f"{case.model_type} is no longer refused ({expected}): take it out of EXPECTED_REFUSALS"
    else:
        assert reason_of(case.refusal) == expected, (
            f"{case.model_type} is refused ({case.refusal}); EXPECTED_REFUSALS says {expected or 'accepted'}")
    if case.refusal is not None:
        assert "are its sparse layers configured" not in case.refusal
        assert (reason_of(case.refusal) == "no experts module in this model class") == (not case.has_experts)
        return
    contract = [m for m in case.model.modules() if follows_contract(m)]
    assert len(case.layers) == len(contract) > 0
    for layer in case.layers:
        w_in, w_out = layer.expert_weights()
        assert layer.num_experts == w_in.shape[0] == w_out.shape[0] == 8
        assert 1 <= layer.top_k <= 8


def test_alignment_keeps_the_logits(case):
    if refuses(case, mf.align_experts, strategy="weight", progress=False):
        return
    model = case.fresh()
    mf.align_experts(model, strategy="weight", progress=False)
    close(out(model), case.reference, tol=1e-4)


def test_statistics_count_the_experts_the_block_chooses(case):
    if refuses(case, mf.collect_routing_stats, batches(), progress=False):
        return
    model = case.fresh()
    seen = {}
    hooks = [layer.module.experts.register_forward_pre_hook(
        lambda m, args, name=layer.name: seen.setdefault(name, []).append(args[1].reshape(-1)))
        for layer in moe_layers(model)]
    with torch.no_grad():
        for b in batches():
            model(**b)
    for h in hooks:
        h.remove()
    stats = mf.collect_routing_stats(model, batches(), progress=False)
    for name, chosen in seen.items():
        chosen = torch.cat(chosen)
        expected = torch.bincount(chosen[chosen < 8], minlength=8).double()  # zero/identity experts aside
        assert torch.equal(stats[name].counts.cpu(), expected), name


def test_merge_save_load_export_compress(case, tmp_path):
    if refuses(case, mf.collect_routing_stats, batches(), progress=False):
        return
    model = case.fresh()
    stats = mf.collect_routing_stats(model, batches(), progress=False)
    every = copy.deepcopy(model)
    mf.merge_experts(every, stats, num_groups=8, globally=False, progress=False)
    close(out(every), case.reference, tol=1e-4)  # every expert its own group: the same model

    mf.merge_experts(model, stats, num_groups=4, progress=False)
    assert all(isinstance(layer.module.experts, MoEExperts) for layer in moe_layers(model))
    merged = out(model)
    loaded = mf.from_pretrained(mf.save_pretrained(model, tmp_path / "merged"))
    close(out(loaded), merged)
    mf.save_pretrained(model, tmp_path / "dense", export_dense=True)
    saved = transformers.AutoConfig.from_pretrained(tmp_path / "dense").architectures[0]
    dense = getattr(transformers, saved).from_pretrained(tmp_path / "dense").eval()  # vanilla transformers
    close(out(dense), merged, tol=1e-4)

    full = copy.deepcopy(model)
    mf.compress_experts(full, rank=10**6, keep_ratio=1.0, progress=False)
    close(out(full), merged, tol=1e-4)
    mf.compress_experts(model, rank=4, keep_ratio=0.3, progress=False)
    compressed = out(model)
    loaded = mf.from_pretrained(mf.save_pretrained(model, tmp_path / "compressed"))
    close(out(loaded), compressed)


def test_optimize_matches_eager_experts(case):
    if refuses(case, mf.optimize):
        return
    model = case.fresh()
    mf.optimize(model)
    assert model.config._experts_implementation == "mcsmoe_fast"
    close(out(model), case.reference, tol=1e-4)


# --- the fixes, one by one (each fails on the code before them) -------------------------------------------

def test_a_router_weight_in_a_nested_linear_is_found():
    """HunYuan's gate.wg: the layers are found, the router weight is the nested Linear's, and streaming's
    stored name points at it."""
    model = tiny_from_model_type("hunyuan_v1_moe")
    layer = moe_layers(model)[0]
    assert layer.router_weight() is layer.module.gate.wg.weight
    assert layer.stored_tensors().router.endswith(".gate.wg.weight")


def test_clamped_swiglu_under_minimax_m3_names():
    """swiglu_alpha / swiglu_limit: GPT-OSS's clamped SwiGLU, run exactly by the fused op."""
    model = tiny_from_model_type("minimax_m3_vl_text")
    layer = moe_layers(model)[0]
    assert layer.activation == "clamped_swiglu"
    assert layer.activation_args == {"alpha": pytest.approx(1.702), "limit": pytest.approx(7.0)}


@pytest.mark.parametrize("model_type, message", [
    ("deepseek_v4", r"takes more than the hidden states \(input_ids"),
    ("inkling_text", r"scores 9 rows for 8 experts"),
    ("longcat_flash", r"scores 10 rows for 8 experts"),
    ("zaya", r"MLP router"),
    ("gemma4_text", r"lives in the decoder layer"),
    ("ergo", r"ErgoExperts: experts with a post-expert norm \(post_expert_norm: ErgoExpertNorm\)"),
    ("glm5_next_text", r"clamped gate and up and no alpha \(silu\(min\(gate, 10\)\)"),
    ("inkling2_text", r"Inkling2Experts._apply_gate \(its own gate\)"),
])
def test_refusals_name_the_real_reason(model_type, message):
    from packaging.version import Version

    if model_type in ("longcat_flash", "ergo") and Version(transformers.__version__) < Version("5.25"):
        pytest.skip(f"{model_type}'s experts (ergo: the model itself) arrive in transformers 5.25; before, the "
                    "refusal is the generic one")
    with pytest.raises(ValueError, match=message) as info:
        moe_layers(tiny_from_model_type(model_type))
    assert "are its sparse layers configured" not in str(info.value)
    assert "activation 'silu' is not supported" not in str(info.value)


@pytest.mark.parametrize("model_type", ["minimax_m2", "hy_v3", "afmoe"])
def test_a_router_taking_the_blocks_bias_routes_as_the_block_does(model_type):
    """MiniMax-M2, HY-V3 (e_score_correction_bias) and AFMoE (expert_bias) keep the bias in the block and pass it
    to the router: the statistics call the router the same way (a bias that moves the choice, so the chosen
    experts differ from the plain logits' top-k)."""
    model = tiny_from_model_type(model_type)
    layer = moe_layers(model)[0]
    bias = next(getattr(layer.module, n) for n in ("e_score_correction_bias", "expert_bias") if hasattr(layer.module, n))
    with torch.no_grad():
        bias.copy_(torch.linspace(-0.5, 0.5, bias.numel()))  # large enough to move choices
    seen = []
    hook = layer.router.register_forward_hook(lambda m, args, out: seen.append(out[2]))
    x = torch.randn(1, 12, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        layer.module(x)
    hook.remove()
    logits, chosen = layer.route(x.reshape(-1, x.shape[-1]))
    assert torch.equal(chosen.sort(-1).values, seen[0].reshape(chosen.shape).long().sort(-1).values)
    plain = logits.topk(layer.top_k, dim=-1).indices.sort(-1).values
    assert not torch.equal(plain, chosen.sort(-1).values)  # the bias mattered


def test_squared_relu_experts_run_on_the_fused_op():
    """Nemotron-H's experts compute relu(x)^2 (transformers' relu2), ungated: the fused op runs it (the walk
    above checks every step against the model's own experts)."""
    assert {layer.activation for layer in moe_layers(tiny_from_model_type("nemotron_h"))} == {"relu2"}


def test_a_model_class_without_experts_is_named():
    with torch.device("meta"):
        vision = model_class_of("qwen3_5_moe_vision")(CONFIG_MAPPING["qwen3_5_moe_vision"]())
    with pytest.raises(ValueError, match="Qwen3_5MoeVisionModel holds no experts module"):
        moe_layers(vision)


def test_a_family_without_a_causal_lm_class_saves_and_loads_back(tmp_path):
    """OpenAI's privacy filter has only a base model class: merged, saved, loaded back as itself."""
    from mcsmoe_fast.models.hub import model_class_for

    model = tiny_from_model_type("openai_privacy_filter")
    assert model_class_for(model.config) is transformers.AutoModel
    stats = mf.collect_routing_stats(model, batches(), progress=False)
    mf.merge_experts(model, stats, num_groups=4, progress=False)
    loaded = mf.from_pretrained(mf.save_pretrained(model, tmp_path / "merged"))
    assert type(loaded) is type(model)
    close(out(loaded), out(model))
