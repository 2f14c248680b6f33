"""REAP saliency (calibrate.py, saliency=...) and expert pruning (prune.py, `mcsmoe-fast prune`) against an
independent transcription of REAP's definition (Lasby et al. 2025, eq. 9) on tiny models: the saliency
values, the experts kept, a model where REAP and frequency pruning must disagree, the pruned standard
checkpoint in vanilla transformers, routing groups and refusals."""
import json
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import mcsmoe_fast.calibrate as calibrate
from mcsmoe_fast import collect_routing_stats, moe_layers
from mcsmoe_fast.checkpoint import save_pretrained
from mcsmoe_fast.cli import main
from mcsmoe_fast.drop import install_logit_mask
from mcsmoe_fast.merge import merge_experts
from mcsmoe_fast.prune import kept_experts, prune_experts, top_experts
from merge_helpers import build, calibration, forward


# --- the transcription: REAP's saliency written from the paper, on transformers' own modules --------------
def block_inputs(model, batches):
    """{block name: routed hidden states [N, d]} of every sparse block, padding left out."""
    blocks = {name: m for name, m in model.named_modules() if hasattr(m, "experts") and hasattr(m, "gate")}
    seen = {name: [] for name in blocks}
    handles = [m.register_forward_pre_hook(lambda mod, args, name=name: seen[name].append(args[0]))
               for name, m in blocks.items()]
    try:
        with torch.no_grad():
            for b in batches:
                seen_before = {n: len(v) for n, v in seen.items()}
                model(**b)
                mask = b["attention_mask"].bool()
                for n in seen:
                    for i in range(seen_before[n], len(seen[n])):
                        seen[n][i] = seen[n][i][mask]
    finally:
        for h in handles:
            h.remove()
    return blocks, {n: torch.cat(v) for n, v in seen.items()}


def expert_output(experts, e: int, x: torch.Tensor) -> torch.Tensor:
    """f_e(x) of a fused gated-SiLU experts module (gate rows, then up rows; down projection)."""
    gate, up = (x @ experts.gate_up_proj[e].double().T).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ experts.down_proj[e].double().T


def reap_by_definition(model, batches, gate_rule: str):
    """{block: saliency [E]}: S_j = mean over tokens whose top-k contains j of g_j(x) ||f_j(x)||_2.
    gate_rule: "renormalised" / "softmax" (softmax routers, computed here from the gate's weight) or "own"
    (the router module's own top-k weights)."""
    blocks, inputs = block_inputs(model, batches)
    out = {}
    for name, block in blocks.items():
        x = inputs[name].double()
        num_experts, k = block.gate.weight.shape[0], model.config.num_experts_per_tok
        if gate_rule == "own":
            _, weights, index = block.gate(inputs[name])
            weights = weights.double()
        else:
            probs = torch.softmax(x @ block.gate.weight.double().T, dim=-1)
            weights, index = probs.topk(k, dim=-1)
            if gate_rule == "renormalised":
                weights = weights / weights.sum(-1, keepdim=True)
        saliency = torch.zeros(num_experts, dtype=torch.float64)
        for j in range(num_experts):
            tokens, slot = torch.where(index == j)
            if len(tokens):
                norms = expert_output(block.experts, j, x[tokens]).norm(dim=-1)
                saliency[j] = (weights[tokens, slot] * norms).mean()
        out[name] = saliency
    return out


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    model = build("mixtral", tmp_path_factory.mktemp("reap"))
    return model, calibration(model, batches=3)


@pytest.mark.parametrize("mode,rule", [("reap", "renormalised"), ("reap-softmax", "softmax")])
def test_saliency_matches_the_definition(mixtral, mode, rule):
    model, batches = mixtral
    stats = collect_routing_stats(model, batches, progress=False, saliency=mode, chunk_tokens=7)
    expected = reap_by_definition(model, batches, rule)
    for name, s in stats.items():
        assert s.saliency_mode == mode
        torch.testing.assert_close(s.saliency.cpu(), expected[name], rtol=1e-5, atol=1e-7)


def test_softmax_option_changes_saliency(mixtral):
    model, batches = mixtral
    renorm = collect_routing_stats(model, batches, progress=False, saliency="reap")
    plain = collect_routing_stats(model, batches, progress=False, saliency="reap-softmax")
    for name in renorm:
        assert (plain[name].saliency < renorm[name].saliency).all()  # the top-k share of a softmax is < 1


@pytest.mark.parametrize("family", ["deepseek_v3", "qwen2_moe"])
def test_router_own_weights(tmp_path, family):
    """DeepSeek-V3's sigmoid router: g is the router's own top-k weight (normalised and scaled as it scales).
    Qwen2-MoE (softmax, norm_topk_prob=False): reap-softmax equals the router's own weights too."""
    model = build(family, tmp_path)
    batches = calibration(model)
    mode = "reap" if family == "deepseek_v3" else "reap-softmax"
    stats = collect_routing_stats(model, batches, progress=False, saliency=mode)
    expected = reap_by_definition(model, batches, "own")
    for name, s in stats.items():
        torch.testing.assert_close(s.saliency.cpu(), expected[name], rtol=1e-5, atol=1e-7)


def test_saliency_runs_only_routed_pairs(mixtral, monkeypatch):
    """The expert outputs come from the fused op, one row per routed (token, expert) pair; no expert runs
    on every token."""
    model, batches = mixtral
    rows = []
    real = calibrate.grouped_expert_ffn

    def counting(hidden, w_in, w_out, emap, index, *args, **kwargs):
        rows.append(int((index >= 0).sum()))
        return real(hidden, w_in, w_out, emap, index, *args, **kwargs)

    monkeypatch.setattr(calibrate, "grouped_expert_ffn", counting)
    monkeypatch.setattr(type(moe_layers(model)[0]), "hidden_activations",
                        lambda *a, **k: pytest.fail("an expert ran on every token"))
    stats = collect_routing_stats(model, batches, progress=False, saliency="reap")
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    assert sum(rows) == tokens * 2 * len(stats)  # top-2, every MoE layer
    assert all(int(s.counts.sum()) == tokens * 2 for s in stats.values())


def test_no_saliency_by_default_and_bad_mode(mixtral):
    model, batches = mixtral
    stats = collect_routing_stats(model, batches[:1], progress=False)
    s = next(iter(stats.values()))
    assert s.saliency_sum is None
    with pytest.raises(ValueError, match="saliency was not collected"):
        s.saliency
    with pytest.raises(ValueError, match="saliency must be None or one of reap, reap-softmax"):
        collect_routing_stats(model, batches, progress=False, saliency="ream")


# --- which experts pruning keeps ---------------------------------------------------------------------
def test_top_experts_ties_and_routing_groups():
    scores = torch.tensor([1.0, 3.0, 3.0, 0.0, 2.0, 2.0, 5.0, 1.0])
    assert top_experts(scores, 3) == [1, 2, 6]
    assert top_experts(scores, 2) == [1, 6]  # tie between 1 and 2: the lower index
    assert top_experts(scores, 4, n_group=2) == [1, 2, 4, 6]  # 4 and 5 tie inside group 2: the lower index


def test_reap_keeps_the_most_salient(mixtral):
    model, batches = mixtral
    stats = collect_routing_stats(model, batches, progress=False, saliency="reap")
    expected = reap_by_definition(model, batches, "renormalised")
    kept = kept_experts(model, stats, num_experts=5, method="reap")
    for name, s in expected.items():
        assert kept[name] == sorted(torch.argsort(s, descending=True)[:5].tolist())
    assert kept_experts(model, stats, ratio=0.375, method="reap") == kept  # 8 - round(3) = 5
    counts = kept_experts(model, stats, num_experts=5, method="frequency")
    for name, s in stats.items():
        assert counts[name] == sorted(sorted(range(8), key=lambda e: (-float(s.counts[e]), e))[:5])


def test_reap_and_frequency_disagree(tmp_path):
    """The most used expert with tiny outputs (down_proj scaled by 1e-4): frequency keeps it, REAP drops it."""
    model = build("mixtral", tmp_path)
    batches = calibration(model, batches=3)
    stats = collect_routing_stats(model, batches, progress=False)
    busiest = {}
    with torch.no_grad():
        for layer in moe_layers(model):
            e = int(torch.argmax(stats[layer.name].counts))
            layer.module.experts.down_proj[e].mul_(1e-4)
            busiest[layer.name] = e
    stats = collect_routing_stats(model, batches, progress=False, saliency="reap")
    by_freq = kept_experts(model, stats, num_experts=4, method="frequency")
    by_reap = kept_experts(model, stats, num_experts=4, method="reap")
    for name, e in busiest.items():
        assert e in by_freq[name] and e not in by_reap[name]


# --- the pruned model --------------------------------------------------------------------------------
LOADER = textwrap.dedent("""
    import json, sys
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM
    job = json.loads(sys.argv[1])
    model = AutoModelForCausalLM.from_pretrained(job["dir"]).eval()
    with torch.no_grad():
        logits = model(**load_file(job["inputs"])).logits
    save_file({"logits": logits.contiguous()}, job["out"])
    assert not any(m.startswith("mcsmoe_fast") for m in sys.modules)
""")


def vanilla_logits(directory, batch, tmp_path):
    from safetensors.torch import load_file, save_file

    save_file({k: v.contiguous() for k, v in batch.items()}, tmp_path / "inputs.safetensors")
    job = {"dir": str(directory), "inputs": str(tmp_path / "inputs.safetensors"), "out": str(tmp_path / "out.st")}
    subprocess.run([sys.executable, "-c", LOADER, json.dumps(job)], check=True, cwd=tmp_path)
    return load_file(job["out"])["logits"]


def test_pruned_model_is_the_masked_router_and_loads_in_transformers(mixtral, tmp_path):
    """Mixtral renormalises over the top-k: pruning equals routing the original with the removed experts'
    logits at -inf (the drop baseline's masked router). The standard checkpoint gives the same logits in a
    process that never imports mcsmoe_fast."""
    model, batches = mixtral
    stats = collect_routing_stats(model, batches, progress=False, saliency="reap")
    pruned = prune_experts(model, stats, num_experts=5)
    assert pruned.config.num_local_experts == 5 and model.config.num_local_experts == 8
    kept = pruned.config.mcsmoe_prune["layers"]
    reference = build("mixtral", tmp_path)
    for layer in moe_layers(reference):
        keep = torch.zeros(8, dtype=torch.bool)
        keep[kept[layer.name]["kept"]] = True
        install_logit_mask(layer, keep)
    ours = forward(pruned, batches[0])
    torch.testing.assert_close(ours, forward(reference, batches[0]), rtol=1e-5, atol=1e-5)
    save_pretrained(pruned, tmp_path / "pruned", format="standard")
    torch.testing.assert_close(vanilla_logits(tmp_path / "pruned", batches[0], tmp_path), ours, rtol=1e-5, atol=1e-5)


def test_deepseek_routing_groups(tmp_path):
    """n_group=2: each routing group keeps its own 2 most salient experts; the checkpoint loads as is."""
    model = build("deepseek_v3", tmp_path)
    batches = calibration(model)
    stats = collect_routing_stats(model, batches, progress=False, saliency="reap")
    pruned = prune_experts(model, stats, num_experts=4)
    for name, entry in pruned.config.mcsmoe_prune["layers"].items():
        s = torch.tensor(entry["scores"])
        expected = sorted(torch.argsort(s[:4], descending=True)[:2].tolist()
                          + (4 + torch.argsort(s[4:], descending=True)[:2]).tolist())
        assert entry["kept"] == expected
        block = pruned.get_submodule(name)
        torch.testing.assert_close(block.gate.e_score_correction_bias,
                                   model.get_submodule(name).gate.e_score_correction_bias[expected])
    save_pretrained(pruned, tmp_path / "pruned", format="standard")
    torch.testing.assert_close(vanilla_logits(tmp_path / "pruned", batches[0], tmp_path), forward(pruned, batches[0]),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="same number of experts in every routing group, at least 2"):
        prune_experts(model, stats, num_experts=5)
    with pytest.raises(ValueError, match="at least 2"):
        prune_experts(model, stats, num_experts=2)


def test_refusals(mixtral, tmp_path):
    model, batches = mixtral
    stats = collect_routing_stats(model, batches[:1], progress=False, saliency="reap")
    with pytest.raises(ValueError, match="num_experts=9 exceeds the 8 experts"):
        prune_experts(model, stats, num_experts=9)
    with pytest.raises(ValueError, match="fewer than the top_k=2"):
        prune_experts(model, stats, num_experts=1)
    with pytest.raises(ValueError, match="exactly one of num_experts"):
        prune_experts(model, stats, num_experts=4, ratio=0.5)
    with pytest.raises(ValueError, match="exactly one of num_experts"):
        prune_experts(model, stats)
    with pytest.raises(ValueError, match=r"ratio .* must be in \[0, 1\)"):
        prune_experts(model, stats, ratio=1.0)
    with pytest.raises(ValueError, match="method must be one of reap, frequency"):
        prune_experts(model, stats, num_experts=4, method="ream")
    plain = collect_routing_stats(model, batches[:1], progress=False)
    with pytest.raises(ValueError, match="needs expert saliency"):
        prune_experts(model, plain, num_experts=4)
    assert prune_experts(model, plain, num_experts=4, method="frequency").config.num_local_experts == 4
    merged = build("mixtral", tmp_path)
    merge_experts(merged, collect_routing_stats(merged, batches[:1], progress=False), 4, globally=False,
                  progress=False)
    with pytest.raises(ValueError, match="is merged or compressed; prune the original model"):
        prune_experts(merged, plain, num_experts=4, method="frequency")


# --- the command -------------------------------------------------------------------------------------
def test_cli_prune(tmp_path, capsys):
    from test_cli_merge import LINES, tiny_tokenizer
    from mcsmoe_fast.tiny import tiny_mixtral

    tiny_mixtral().save_pretrained(tmp_path / "mixtral")
    tiny_tokenizer().save_pretrained(tmp_path / "mixtral")
    (tmp_path / "calib.txt").write_text("\n".join(LINES * 4) + "\n")
    args = ["prune", "--model", tmp_path / "mixtral", "--calib", tmp_path / "calib.txt", "--ratio", 0.5]
    assert main([str(a) for a in args + ["--out", tmp_path / "reap"]]) == 0
    out = capsys.readouterr().out
    assert "reap pruning of 2 layers" in out and "saved standard checkpoint" in out
    config = json.loads((tmp_path / "reap" / "config.json").read_text())
    assert config["num_local_experts"] == 4 and config["mcsmoe_prune"]["method"] == "reap"
    assert main([str(a) for a in args + ["--method", "frequency", "--out", tmp_path / "freq"]]) == 0
    capsys.readouterr()
    config = json.loads((tmp_path / "freq" / "config.json").read_text())
    assert config["mcsmoe_prune"]["method"] == "frequency"
    assert main([str(a) for a in args[:-2] + ["--num-experts", 1, "--out", tmp_path / "bad"]]) == 2
    assert "fewer than the top_k=2" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_cli_prune_larger_than_memory_writes_the_in_memory_checkpoint(tmp_path, capsys):
    """--max-memory below the model's size: pruned layer by layer from the shards (streaming.prune), the same
    tensors and config as the in-memory command."""
    from safetensors.torch import load_file
    from test_cli_merge import LINES, tiny_tokenizer
    from mcsmoe_fast.tiny import tiny_mixtral

    tiny_mixtral().save_pretrained(tmp_path / "mixtral", max_shard_size="60KB")
    tiny_tokenizer().save_pretrained(tmp_path / "mixtral")
    (tmp_path / "calib.txt").write_text("\n".join(LINES * 4) + "\n")
    args = ["prune", "--model", tmp_path / "mixtral", "--calib", tmp_path / "calib.txt", "--ratio", 0.5]
    assert main([str(a) for a in args + ["--out", tmp_path / "memory"]]) == 0
    assert "pruning of 2 layers in" in capsys.readouterr().out
    assert main([str(a) for a in args + ["--max-memory", "1KB", "--offload-dir", tmp_path / "acts",
                                         "--out", tmp_path / "streamed"]]) == 0
    assert "pruning layer by layer from the checkpoint's shards" in capsys.readouterr().out

    def tensors(d):
        out = {}
        for p in sorted(d.glob("*.safetensors")):
            out.update(load_file(str(p)))
        return out

    a, b = tensors(tmp_path / "memory"), tensors(tmp_path / "streamed")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    ca, cb = (json.loads((tmp_path / d / "config.json").read_text()) for d in ("memory", "streamed"))
    assert ca["mcsmoe_prune"]["layers"].keys() == cb["mcsmoe_prune"]["layers"].keys()
    assert all(ca["mcsmoe_prune"]["layers"][k]["kept"] == cb["mcsmoe_prune"]["layers"][k]["kept"]
               for k in ca["mcsmoe_prune"]["layers"])
