"""Half-precision (bfloat16 / float16) models through the exports, the loaders and the fitted router: the tensors
transformers keeps in float32 stay float32 in every export, a cast to float16 that would make weights inf is refused
naming them, and a half-precision GPT-OSS router is fitted to the same objective as in float32."""
import pytest
import torch
import torch.nn.functional as F

import mcsmoe_fast as mf
from mcsmoe_fast import open_model
from mcsmoe_fast.checkpoint.dense import to_dense
from mcsmoe_fast.checkpoint.standard import to_standard
from mcsmoe_fast.checkpoint.standard_router import routing_targets
from mcsmoe_fast.models import moe_layers
from mcsmoe_fast.models.hub import cast_as_loaded_, float32_kept
from mcsmoe_fast.prune import prune_experts
from mcsmoe_fast.tiny import tiny_mixtral, tiny_moe
from merge_helpers import calibration


def saved_gpt_oss(tmp_path, dtype=None):
    """A tiny GPT-OSS saved to tmp_path (its norm weights 1 + 0.1 N(0, 1): no float16 value holds them exactly)."""
    model = tiny_moe("gpt_oss")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
    if dtype is not None:
        model = model.to(dtype)
    path = tmp_path / "gpt_oss"
    model.save_pretrained(path)
    return path


# --- finding 2: the in-memory exports keep transformers' float32 tensors in float32 ---------------------------------
def test_exports_of_a_float16_gpt_oss_keep_its_float32_norms(tmp_path):
    model = open_model(str(saved_gpt_oss(tmp_path)), dtype=torch.float16)
    kept = float32_kept(model, torch.float16)
    source = {k: v.clone() for k, v in model.state_dict().items() if k in kept}
    assert source and all(v.dtype == torch.float32 and not torch.equal(v, v.half().float()) for v in source.values())
    stats = mf.collect_routing_stats(model, calibration(model), progress=False, saliency="reap")
    outputs = {"prune_experts": prune_experts(model, stats, 4)}
    mf.merge_experts(model, stats, 4, globally=False, progress=False)
    outputs["to_standard"], outputs["to_dense"] = to_standard(model), to_dense(model)
    for what, out in outputs.items():
        state = out.state_dict()
        for k, v in source.items():
            assert state[k].dtype == torch.float32, f"{what}: {k} is {state[k].dtype}"
            assert torch.equal(state[k], v), f"{what}: {k} differs from the loaded model's"


# --- finding 3: a cast to float16 that makes weights inf is refused, naming them --------------------------------------
def saved_mixtral_bf16(tmp_path, big: float):
    model = tiny_mixtral().to(torch.bfloat16)
    with torch.no_grad():
        model.model.layers[0].mlp.experts.down_proj[0, 0, 0] = big  # finite in bfloat16
    path = tmp_path / "mixtral"
    model.save_pretrained(path)
    return path


def test_float16_load_refuses_weights_beyond_its_range(tmp_path):
    in_range = saved_mixtral_bf16(tmp_path / "in_range", 6e4)
    half = open_model(str(in_range), dtype=torch.float16).state_dict()
    for k, v in open_model(str(in_range), dtype=torch.bfloat16).state_dict().items():
        assert torch.equal(half[k], v.half()), k
    path = saved_mixtral_bf16(tmp_path, 1e5)
    assert open_model(str(path), dtype=torch.bfloat16).model.layers[0].mlp.experts.down_proj[0, 0, 0] == 1e5
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.experts\.down_proj: 1 value beyond float16's "
                                         r"range .*use --dtype bfloat16 or float32"):
        open_model(str(path), dtype=torch.float16)


def test_cast_as_loaded_refuses_weights_beyond_float16s_range():
    model = tiny_mixtral().to(torch.bfloat16)
    with torch.no_grad():
        model.model.layers[1].mlp.experts.gate_up_proj[2, 0, :3] = torch.tensor([-2.0**17, 2.0**16, 1.0])
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.experts\.gate_up_proj: 2 values beyond float16's "
                                         r"range \(max \|w\| 1\.311e\+05 > 65504\)"):
        cast_as_loaded_(model, torch.float16)


def test_merge_refuses_non_finite_merged_experts():
    model = tiny_mixtral()
    stats = mf.collect_routing_stats(model, calibration(model), progress=False)
    with torch.no_grad():
        model.model.layers[0].mlp.experts.down_proj[3, 0, 0] = float("inf")
    refused = r"layer 'model\.layers\.0\.mlp': merged experts \[\d\] \(of experts \[\[[\d, ]*\b3\b.*\]\]\) are not finite"
    with pytest.raises(ValueError, match=refused):
        mf.merge_experts(model, stats, 4, globally=False, permute=False, progress=False)


# --- finding 4: a half-precision GPT-OSS router is recognised as renormalising -----------------------------------------
def renormalised_targets(layer, hidden, groups):
    """The chosen members' renormalised top-k weights summed per group, computed in float32 from the router's
    weight and bias (GPT-OSS: a softmax over the top-k logits)."""
    weight, bias = layer.router_weight().float(), layer.router_rows()[0].bias.float()
    top, index = F.linear(hidden.float(), weight, bias).topk(layer.top_k, dim=-1)
    position = torch.tensor([g for e in range(layer.num_experts) for g, m in enumerate(groups) if e in m])
    return torch.zeros(hidden.shape[0], len(groups)).scatter_add_(1, position[index], top.softmax(-1))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fitted_targets_of_a_half_gpt_oss_are_its_renormalised_weights(tmp_path, dtype):
    model = open_model(str(saved_gpt_oss(tmp_path, dtype)), dtype="auto")
    layer = moe_layers(model)[0]
    hidden = torch.randn(64, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    hidden = hidden.to(dtype).float()  # what the half router sees
    groups = [[0, 1], [2, 3], [4, 5], [6, 7]]
    target, reference = routing_targets(layer, hidden, groups), renormalised_targets(layer, hidden, groups)
    assert (target - reference).abs().max() < 4 * torch.finfo(dtype).eps


def test_streamed_reads_refuse_weights_beyond_float16s_range(tmp_path):
    """The streamed steps read every tensor into the run's dtype (streaming/source.py): the same refusal, naming the
    tensor, before the REAP saliency turned the inf into a NaN of another layer."""
    from mcsmoe_fast.streaming.prune import prune_checkpoint

    path = saved_mixtral_bf16(tmp_path, 1e5)
    model = open_model(str(path), dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.experts\.down_proj: 1 value beyond float16's range"):
        prune_checkpoint(path, tmp_path / "out", calibration(model), num_experts=4, max_memory="1KB",
                         dtype=torch.float16, progress=False)
    assert not (tmp_path / "out").exists()
    in_range = saved_mixtral_bf16(tmp_path / "in_range", 6e4)
    prune_checkpoint(in_range, tmp_path / "ok", calibration(model), num_experts=4, max_memory="1KB",
                     dtype=torch.float16, progress=False)


def test_the_cli_names_the_tensor_beyond_float16s_range(tmp_path, capsys):
    from mcsmoe_fast.cli import main

    path = saved_mixtral_bf16(tmp_path, 1e5)
    assert main(["compress", "--model", str(path), "--rank", "2", "--dtype", "float16", "--out",
                 str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "down_proj: 1 value beyond float16's range" in err and "does not load" not in err


def test_a_block_fp8_merged_checkpoint_loaded_in_float16_refuses_weights_beyond_its_range(tmp_path):
    """A merged checkpoint kept in block FP8 is dequantized straight into float16 (no cast to check): FP8 holds no
    inf, so any inf there is the cast's."""
    from mcsmoe_fast.streaming.quantized import quantize_checkpoint
    from mcsmoe_fast.streaming.requantize_merged import requantize_merged

    fp8 = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    model = tiny_mixtral(num_experts=4, hidden_size=160, intermediate_size=96, num_layers=2, seed=5)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[0, 0] = 1e5
    model.save_pretrained(tmp_path / "m")
    quantize_checkpoint(tmp_path / "m", tmp_path / "fp8", fp8)
    model = open_model(str(tmp_path / "fp8"))
    mf.merge_experts(model, mf.collect_routing_stats(model, calibration(model), progress=False), 2, globally=False,
                     progress=False)
    mf.save_pretrained(model, tmp_path / "merged")
    requantize_merged(tmp_path / "merged", tmp_path / "fp8")
    with pytest.raises(ValueError, match=r"self_attn\.q_proj\.weight: 1 value beyond float16's range"):
        mf.from_pretrained(tmp_path / "merged", dtype=torch.float16)
    assert torch.isfinite(mf.from_pretrained(tmp_path / "merged", dtype=torch.bfloat16)
                          .model.layers[0].self_attn.q_proj.weight).all()
