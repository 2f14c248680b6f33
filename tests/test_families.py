"""Every transformers MoE family of the experts contract, through every step, against the HF model's own
outputs: the generic adapter (models/experts.py), the experts implementation (modules/experts_interface.py) and
optimize. Tiny random models are saved and loaded offline through the code a user runs on a hub id."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

import mcsmoe_fast as mf
from mcsmoe_fast.activations import apply
from mcsmoe_fast.modules import experts_interface
from mcsmoe_fast.models import ExpertsLayer
from mcsmoe_fast.modules.experts_spec import ExpertsSpec
from mcsmoe_fast.modules import MoEExperts
from mcsmoe_fast.tiny import FAMILY_NAMES, tiny_moe

FAMILIES = list(FAMILY_NAMES)
SHARED = {"qwen2_moe": "shared_expert", "qwen3_next": "shared_expert", "deepseek_v3": "shared_experts"}


def ids(seed=0, batch=2, length=12):
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def batches(n=3):
    return [{"input_ids": ids(seed=s)} for s in range(n)]


@torch.no_grad()
def logits(model, x=None):
    return model(input_ids=ids() if x is None else x).logits


def close(a, b, tol=1e-5):
    assert a.shape == b.shape
    assert torch.allclose(a, b, atol=tol, rtol=tol), (a - b).abs().max().item()


class CountCalls:
    """Calls of our experts implementation: the fused op, or for interleaved gate/up (GPT-OSS) the composed
    path on the stored banks."""
    def __init__(self, monkeypatch):
        self.n = 0
        for owner, name in ((experts_interface.ops, "grouped_expert_ffn"), (experts_interface, "interleaved_forward")):
            monkeypatch.setattr(owner, name, self.counted(getattr(owner, name)))

    def counted(self, real):
        def call(*args, **kwargs):
            self.n += 1
            return real(*args, **kwargs)
        return call


@pytest.mark.parametrize("family", FAMILIES)
def test_layers_are_found_by_structure(family):
    model = tiny_moe(family, num_layers=2)
    layers = mf.moe_layers(model)
    assert len(layers) == 2 and all(isinstance(layer, ExpertsLayer) for layer in layers)
    if family == "deepseek_v3":  # first_k_dense_replace=1: layer 0 is a dense MLP and is left alone
        assert [layer.name for layer in layers] == ["model.layers.1.mlp", "model.layers.2.mlp"]
    for layer in layers:
        assert layer.num_experts == 8 and layer.top_k == 2
        w_in, w_out = layer.expert_weights()
        assert w_in.shape == (8, 96, 32) and w_out.shape == (8, 32, 48)
    assert (layers[0].activation == "clamped_swiglu") == (family == "gpt_oss")
    assert (layers[0].expert_biases()[0] is not None) == (family == "gpt_oss")


@pytest.mark.parametrize("family", FAMILIES)
def test_canonical_expert_ffn_equals_the_family_experts_module(family):
    """The adapter's view (w_in, w_out, biases, activation) computes exactly what the HF experts compute."""
    model = tiny_moe(family)
    layer = mf.moe_layers(model)[0]
    x = torch.randn(5, 32)
    for e in (0, 5):
        index = torch.full((5, 1), e)
        theirs = layer.module.experts(x, index, torch.ones(5, 1))
        w_in, w_out = layer.expert_weights()
        b_in, b_out = layer.expert_biases()
        h = layer.hidden_activations(x, e)
        mine = h @ w_out[e].T + (0 if b_out is None else b_out[e])
        close(mine, theirs)
        if b_in is not None:  # the input bias really enters hidden_activations
            without = apply(x @ w_in[e].T.detach(), layer.activation, **layer.activation_args)
            assert not torch.allclose(h, without)


def test_gpt_oss_layout_round_trips():
    """Transposed, interleaved gate/up with biases: reading then writing the canonical tensors is exact, and
    a permutation written back lands on the interleaved columns."""
    experts = tiny_moe("gpt_oss").model.layers[0].mlp.experts
    spec = ExpertsSpec.of(experts)
    assert spec.transposed and not spec.concatenated and spec.has_bias
    before = {k: v.clone() for k, v in experts.state_dict().items()}
    w_in, w_out = spec.weights(experts)
    b_in, b_out = spec.biases(experts)
    assert torch.equal(w_in[:, :48], experts.gate_up_proj[:, :, 0::2].transpose(1, 2))
    assert torch.equal(w_in[:, 48:], experts.gate_up_proj[:, :, 1::2].transpose(1, 2))
    assert torch.equal(b_in[:, 48:], experts.gate_up_proj_bias[:, 1::2])
    spec.write(experts, w_in.clone(), w_out.clone(), b_in.clone(), b_out.clone())
    for k, v in experts.state_dict().items():
        assert torch.equal(v, before[k]), k
    spec.write(experts, w_in.flip(1).clone(), w_out, b_in.flip(1).clone(), b_out)
    assert torch.equal(experts.gate_up_proj[:, :, 0], before["gate_up_proj"][:, :, -1])  # up ff-1 -> gate 0
    assert torch.equal(experts.gate_up_proj_bias[:, 1], before["gate_up_proj_bias"][:, -2])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("strategy", ["weight", "activation"])
def test_alignment_preserves_the_function(family, strategy):
    model = tiny_moe(family)
    before = logits(model)
    w_before = mf.moe_layers(model)[0].expert_weights()[0].clone()
    perms = mf.align_experts(model, strategy=strategy, batches=batches(), progress=False)
    assert any(not torch.equal(p, torch.arange(p.shape[1]).expand_as(p)) for p in perms.values())
    assert not torch.equal(mf.moe_layers(model)[0].expert_weights()[0], w_before)
    close(logits(model), before)


@pytest.mark.parametrize("family", FAMILIES)
def test_routing_statistics_count_the_experts_the_model_chooses(family):
    """DeepSeek-V3's group-limited sigmoid top-k, GPT-OSS's biased logits...: the counts are the family's
    own choices, read from what its block passes to the experts module."""
    model = tiny_moe(family)
    seen = {}
    hooks = [layer.module.experts.register_forward_pre_hook(
        lambda m, args, name=layer.name: seen.setdefault(name, []).append(args[1].reshape(-1)))
        for layer in mf.moe_layers(model)]
    data = batches()
    with torch.no_grad():
        for b in data:
            model(**b)
    for h in hooks:
        h.remove()
    stats = mf.collect_routing_stats(model, data, progress=False)
    for name, chosen in seen.items():
        expected = torch.bincount(torch.cat(chosen), minlength=8).double()
        assert torch.equal(stats[name].counts.cpu(), expected), name


@pytest.mark.parametrize("family", FAMILIES)
def test_merge_with_every_group_equals_the_original(family):
    """G = E: nothing to average, the merged model (MoEExperts through the fused op, biases and clamped
    SwiGLU included) computes what the HF model computes."""
    model = tiny_moe(family)
    before = logits(model)
    stats = mf.collect_routing_stats(model, batches(), progress=False)
    mf.merge_experts(model, stats, num_groups=8, globally=False, progress=False)
    assert all(isinstance(layer.module.experts, MoEExperts) for layer in mf.moe_layers(model))
    close(logits(model), before)


@pytest.mark.parametrize("family", FAMILIES)
def test_merged_model_saves_loads_and_exports_dense(family, tmp_path):
    model = tiny_moe(family)
    stats = mf.collect_routing_stats(model, batches(), progress=False)
    groups = mf.merge_experts(model, stats, num_groups=3, progress=False)
    merged = logits(model)
    layer = mf.moe_layers(model)[-1]
    assert layer.module.experts.num_slots == groups[layer.name].num_groups < 8
    if family in SHARED:  # shared experts are siblings of `experts`, never merged
        assert not isinstance(getattr(layer.module, SHARED[family]), MoEExperts)
    if family == "gpt_oss":  # merged biases: the group's frequency-weighted average of the members' biases
        assert layer.module.experts.b_in is not None and layer.module.experts.b_out is not None

    mf.save_pretrained(model, tmp_path / "merged")
    loaded = mf.from_pretrained(tmp_path / "merged")
    close(logits(loaded), merged)
    for a, b in zip(mf.moe_layers(loaded), mf.moe_layers(model)):
        assert torch.equal(a.expert_map().cpu(), b.expert_map().cpu())

    mf.save_pretrained(model, tmp_path / "dense", export_dense=True)
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense").eval()
    close(logits(dense), merged)


def test_merged_gpt_oss_biases_are_the_weighted_group_average():
    model = tiny_moe("gpt_oss")
    layer = mf.moe_layers(model)[0]
    b_out = layer.expert_biases()[1].detach().clone()
    stats = mf.collect_routing_stats(model, batches(), progress=False)
    g = mf.merge_experts(model, stats, num_groups=3, globally=False, progress=False)[layer.name]
    merged = mf.moe_layers(model)[0].module.experts.b_out
    for slot, (members, weights) in enumerate(zip(g.groups, g.weights)):
        expected = sum(w * b_out[e] for e, w in zip(members, weights))
        close(merged[slot].detach(), expected, tol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_optimize_keeps_the_family_modules_and_names(family, tmp_path, monkeypatch):
    model = tiny_moe(family)
    before, names = logits(model), sorted(model.state_dict())
    calls = CountCalls(monkeypatch)
    assert mf.optimize(model) is model
    assert model.config._experts_implementation == "mcsmoe_fast"
    assert sorted(model.state_dict()) == names
    close(logits(model), before)
    assert calls.n == 2  # one fused call per MoE layer

    model.save_pretrained(tmp_path)  # transformers' own save and load: nothing renamed, nothing lost
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    close(logits(reloaded), before)

    model.set_experts_implementation("eager")  # transformers' switch still works after optimize
    calls.n = 0
    close(logits(model), before)
    assert calls.n == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_from_pretrained_with_the_mcsmoe_fast_experts_implementation(family, tmp_path, monkeypatch):
    tiny_moe(family).save_pretrained(tmp_path)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    calls = CountCalls(monkeypatch)
    fast = AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation="mcsmoe_fast").eval()
    close(logits(fast), logits(plain))
    assert calls.n == 2


@pytest.mark.parametrize("family", ["gpt_oss", "qwen3_moe"])
def test_experts_implementation_trains_the_family_parameters(family):
    """Under autograd the fused op's gradients reach the family's own parameters (GPT-OSS: through the
    transposed, interleaved layout) and equal eager transformers' gradients."""
    grads = {}
    for impl in ("eager", "mcsmoe_fast"):
        model = tiny_moe(family).train()
        model.set_experts_implementation(impl)
        model(input_ids=ids(), labels=ids()).loss.backward()
        experts = model.model.layers[-1].mlp.experts
        grads[impl] = {n: p.grad.clone() for n, p in experts.named_parameters()}
    for name, g in grads["eager"].items():
        close(grads["mcsmoe_fast"][name], g, tol=1e-4)


def test_experts_implementation_keeps_no_canonical_copy_and_sees_every_weight_change():
    model = tiny_moe("gpt_oss")
    model.set_experts_implementation("mcsmoe_fast")
    experts = model.model.layers[0].mlp.experts
    x = ids()
    first = logits(model, x)
    assert not any(isinstance(v, torch.Tensor) for v in experts.__dict__.values())  # no copy kept between calls
    with torch.no_grad():
        experts.down_proj_bias.add_(0.5)  # an in-place update (an optimizer step)
        experts.gate_up_proj.data.mul_(2.0)  # and one through .data (no version bump)
    changed = logits(model, x)
    model.set_experts_implementation("eager")
    close(changed, logits(model, x))
    assert not torch.allclose(changed, first)


def test_experts_implementation_honours_an_expert_map():
    """An experts module carrying `expert_map` (E experts on G slots) runs each expert on its slot."""
    experts = tiny_moe("mixtral").model.layers[0].mlp.experts
    emap = torch.tensor([0, 0, 1, 1, 2, 2, 0, 1])
    experts.gate_up_proj = torch.nn.Parameter(experts.gate_up_proj[:3].detach().clone())
    experts.down_proj = torch.nn.Parameter(experts.down_proj[:3].detach().clone())
    experts.register_buffer("expert_map", emap)
    x, index = torch.randn(6, 32), torch.randint(0, 8, (6, 2))
    weights = torch.rand(6, 2)
    out = experts_interface.mcsmoe_fast_experts_forward(experts, x, index, weights)
    expected = MoEExperts(experts.gate_up_proj.detach(), experts.down_proj.detach(), emap, "swiglu")(x, index, weights)
    close(out, expected)


GATED_NAME = {"relu": "reglu", "gelu": "geglu", "gelu_new": "geglu_tanh", "gelu_pytorch_tanh": "geglu_tanh",
              "silu": "swiglu"}


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "gpt_oss"])  # GPT-OSS: its own clamped SwiGLU
@pytest.mark.parametrize("hidden_act", list(GATED_NAME))
def test_the_configured_activation_is_read_from_the_model(family, hidden_act, monkeypatch):
    model = tiny_moe(family, hidden_act=hidden_act)
    before = logits(model)
    assert mf.moe_layers(model)[0].activation == GATED_NAME[hidden_act]
    calls = CountCalls(monkeypatch)
    mf.optimize(model)
    close(logits(model), before)
    assert calls.n == 2


def test_an_activation_the_fused_op_does_not_know_is_refused_by_name(tmp_path):
    model = tiny_moe("mixtral", hidden_act="quick_gelu")
    with pytest.raises(ValueError, match="quick_gelu"):
        mf.moe_layers(model)
    with pytest.raises(ValueError, match="quick_gelu"):
        mf.optimize(model)
    model.save_pretrained(tmp_path)
    fast = AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation="mcsmoe_fast")
    with pytest.raises(ValueError, match="quick_gelu"):
        logits(fast)


def test_models_without_moe_layers():
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(ValueError, match="no MoE layer mcsmoe_fast can handle"):
        mf.moe_layers(llama)
    dense = tiny_moe("deepseek_v3", first_k_dense_replace=3)  # every layer dense
    assert mf.moe_layers(dense, allow_empty=True) == []
    with pytest.warns(UserWarning, match="no MoE layer"):
        assert mf.optimize(dense) is dense


def merge_then_compress(model, data, tmp_path, check_block=None):
    """Merge to 4 groups, check that full-rank compression keeping every row is the merged model, compress for
    real (rank 4, keep 30%, activation importance), check_block(layer) on each compressed layer, save; returns
    the reloaded model after checking it gives exactly the compressed model's logits."""
    mf.merge_experts(model, mf.collect_routing_stats(model, data, progress=False), num_groups=4, progress=False)
    merged = logits(model)
    full = copy.deepcopy(model)
    mf.compress_experts(full, rank=10**6, keep_ratio=1.0, progress=False)
    close(logits(full), merged)
    stats = mf.collect_routing_stats(model, data, progress=False, input_norms=True)
    mf.compress_experts(model, rank=4, keep_ratio=0.3, importance="activation", stats=stats, progress=False)
    compressed = logits(model)
    assert not torch.allclose(compressed, merged, atol=1e-3)
    for layer in mf.moe_layers(model) if check_block else ():
        check_block(layer)
    loaded = mf.from_pretrained(mf.save_pretrained(model, tmp_path / "compressed"))
    torch.testing.assert_close(logits(loaded), compressed, rtol=0, atol=0)
    return loaded


@pytest.mark.parametrize("family", FAMILIES)
def test_compression_of_merged_experts(family, tmp_path):
    """MC-SMoE's "then compress" on every family: at full rank keeping every row it is the merged model
    (GPT-OSS's biases and clamped SwiGLU included); a real compression saves, reloads exactly, and its
    fine-tuning gradient reaches the factors (and the biases)."""
    data = batches()
    loaded = merge_then_compress(tiny_moe(family), data, tmp_path)
    experts = mf.moe_layers(loaded)[0].module.experts
    assert (experts.b_in is not None) == (family == "gpt_oss")
    loaded.train()
    loaded(**data[0]).logits.float().pow(2).mean().backward()
    assert experts.in_U.grad.abs().sum() > 0
    assert family != "gpt_oss" or experts.b_in.grad.abs().sum() > 0


@pytest.mark.parametrize("family", ["gpt_oss", "deepseek_v3", "qwen3_next"])  # biased logits, sigmoid groups, ...
def test_the_drop_baseline_is_refused_on_gates_it_cannot_mask(family):
    model = tiny_moe(family)
    before = logits(model)
    stats = mf.collect_routing_stats(model, batches(), progress=False)
    with pytest.raises(ValueError, match="drop baseline masks router logits of Switch's router and softmax top-k"):
        mf.merge_experts(model, stats, num_groups=4, strategy="drop", progress=False)
    assert not any(isinstance(layer.module.experts, MoEExperts) for layer in mf.moe_layers(model))  # untouched
    torch.testing.assert_close(logits(model), before, rtol=0, atol=0)
