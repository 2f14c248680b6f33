"""merge_checkpoint(device_map=...): the statistics pass on accelerate's big-model inference (CPU and
disk offload here, GPUs where present), equal to the in-memory pipeline; routing statistics of a
dispatched model; the families only their own forward runs; options and the CLI."""
import json

import pytest
import torch

import mcsmoe_fast.streaming.passes as passes
from mcsmoe_fast import align_experts, collect_routing_stats, open_model
from mcsmoe_fast.models.dispatched import compute_device, onloaded
from mcsmoe_fast.streaming import merge_checkpoint, permute_checkpoint
from mcsmoe_fast.streaming.dispatch import check_device_map, split_memory
from mcsmoe_fast.tiny import tiny_mixtral, tiny_moe, tiny_switch
from merge_helpers import calibration
from streaming_helpers import NUM_GROUPS, assert_same_checkpoint, in_memory, quiet_merge

# layer 0 and the head on the CPU, layers 1 and 2 offloaded to disk
MIXED = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
         "model.layers.2": "disk", "model.norm": "cpu", "lm_head": "cpu"}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    path = tmp_path_factory.mktemp("device-map") / "mixtral-sharded"
    tiny_mixtral(num_layers=3, seed=6).save_pretrained(path, max_shard_size="60KB")
    return path


@pytest.fixture(scope="module")
def batches():
    return calibration(tiny_mixtral(num_layers=1), seed=7, batches=3, batch=2, length=9)


def no_cut_forward(monkeypatch):
    """The device-map path must not run the layer-by-layer forward."""
    def refuse(*args, **kwargs):
        raise AssertionError("the cut forward ran")

    monkeypatch.setattr(passes, "run_layer", refuse)


@pytest.mark.parametrize("device_map, max_memory", [(MIXED, None), ("auto", {"cpu": "40KB"}), ("auto", "40KB")],
                         ids=["cpu-and-disk", "auto-dict-budget", "auto-one-size"])
@pytest.mark.parametrize("globally", [True, False], ids=["global", "per-layer"])
def test_device_map_merge_equals_in_memory_pipeline(source, batches, tmp_path, monkeypatch, device_map, max_memory,
                                                    globally):
    expected = in_memory(source, tmp_path / "expected", batches, globally=globally)
    no_cut_forward(monkeypatch)
    offload = tmp_path / "offload"
    offload.mkdir()
    result = quiet_merge(source, tmp_path / "streamed", batches, NUM_GROUPS, globally=globally,
                         device_map=device_map, max_memory=max_memory, offload_dir=offload, max_shard_size="30KB")
    assert result.offloaded  # accelerate put layers on disk
    assert result.passes == 2
    assert_same_checkpoint(expected, result.path, batches)
    assert list(offload.iterdir()) == []  # what accelerate offloaded is removed
    assert sorted(p.name for p in result.path.iterdir() if p.name.startswith(".")) == []


@pytest.mark.parametrize("device_map", [MIXED, None], ids=["offloaded-layers", "offloaded-activations"])
def test_a_killed_runs_offload_directories_are_removed_by_the_next_run(source, batches, tmp_path, device_map):
    """Offloaded layers or activations of a run killed with SIGKILL (nothing ran to clean them up) are
    removed by the next run in the same --offload-dir; a live run's and other files are left alone."""
    import os
    import subprocess
    import sys

    from mcsmoe_fast.checkpoint import OWNER_FILE

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    offload = tmp_path / "offload"
    prefix = ".mcsmoe-offload-" if device_map else ".mcsmoe-activations-"
    stale, live, other = offload / f"{prefix}dead", offload / f"{prefix}live", offload / "user-file.txt"
    for d, pid in ((stale, dead.pid), (live, os.getppid())):
        d.mkdir(parents=True)
        (d / OWNER_FILE).write_text(str(pid))
        (d / "weights.dat").write_bytes(b"0" * 100)
    other.write_text("mine")
    quiet_merge(source, tmp_path / "out", batches, NUM_GROUPS, device_map=device_map, offload_dir=offload,
                max_memory=None if device_map else "1KB")
    assert sorted(p.name for p in offload.iterdir()) == sorted([live.name, other.name])


@pytest.mark.parametrize("similarity", ["expert-output", "weight"])
def test_device_map_with_offloaded_expert_outputs_and_compression(source, batches, tmp_path, similarity):
    """expert-output reads an offloaded block's experts outside its forward (onloaded), and the
    one-shot compression stage follows the device-map pass as it follows the cut one."""
    compress = dict(rank=4, keep_ratio=0.3)
    expected = in_memory(source, tmp_path / "expected", batches, compress=compress, similarity=similarity)
    result = quiet_merge(source, tmp_path / "streamed", batches, NUM_GROUPS, similarity=similarity,
                         compress=compress, device_map=MIXED)
    assert_same_checkpoint(expected, result.path, batches)


def dispatched(path, tmp_path, device_map=MIXED):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), device_map=device_map, offload_folder=str(tmp_path / "off"),
                                                dtype=torch.float32).eval()


def test_routing_statistics_of_a_dispatched_model_equal_the_loaded_model(source, batches, tmp_path):
    model = dispatched(source, tmp_path)
    offloaded = model.model.layers[1].mlp.experts
    assert offloaded.gate_up_proj.device.type == "meta"
    bases = ("router-logits", "feature", "expert-output")
    got = collect_routing_stats(model, batches, bases=bases, input_norms=True, progress=False)
    want = collect_routing_stats(open_model(str(source)), batches, bases=bases, input_norms=True, progress=False)
    assert got.keys() == want.keys()
    for name in want:
        for field in ("counts", "logit_gram", "feature_sum", "output_sum", "slot_input_sq", "slot_hidden_sq"):
            torch.testing.assert_close(getattr(got[name], field), getattr(want[name], field), rtol=1e-12, atol=1e-9,
                                       msg=f"{name}.{field}")
        assert got[name].counts.device.type == "cpu"
    assert offloaded.gate_up_proj.device.type == "meta"  # offloaded again after the statistics


def test_onloaded_and_compute_device(source, tmp_path):
    model = dispatched(source, tmp_path)
    block = model.model.layers[2].mlp
    assert compute_device(block, block.experts.gate_up_proj) == torch.device("cpu")
    with onloaded(block):
        assert block.experts.gate_up_proj.device.type == "cpu"
        assert block.gate.weight.device.type == "cpu"
    assert block.experts.gate_up_proj.device.type == "meta"
    resident = model.model.layers[0].mlp
    with onloaded(resident):  # nothing offloaded: unchanged
        assert resident.experts.gate_up_proj.device.type == "cpu"
    bare = tiny_mixtral(num_layers=1).to("meta").model.layers[0].mlp
    with pytest.raises(ValueError, match="meta device and no accelerate hook"):
        compute_device(bare, bare.experts.gate_up_proj)


@pytest.mark.parametrize("family", ["qwen3_next", "qwen3_5_moe", "gpt_oss"])
def test_families_only_their_own_forward_runs(family, batches, tmp_path):
    """Qwen3-Next and Qwen3.5-MoE (linear attention layers, shared experts) stream with a device map, and
    permute streams them with no forward at all; GPT-OSS (which the cut forward runs too) also
    streams through accelerate."""
    src = tmp_path / family
    tiny_moe(family, num_layers=3, seed=8).save_pretrained(src, max_shard_size="60KB")
    if family != "gpt_oss":
        with pytest.raises(ValueError, match="linear attention.*pass device_map"):
            merge_checkpoint(src, tmp_path / "refused", batches, NUM_GROUPS, progress=False)
        assert not (tmp_path / "refused").exists()
    expected = in_memory(src, tmp_path / "expected", batches)
    result = quiet_merge(src, tmp_path / "streamed", batches, NUM_GROUPS, device_map="auto", max_memory="50KB")
    assert result.offloaded
    assert_same_checkpoint(expected, result.path, batches)

    from mcsmoe_fast.models.hub import load_model

    perms = permute_checkpoint(src, tmp_path / "permuted", reference=1, progress=False)
    model = open_model(str(src))
    assert set(perms) == set(align_experts(model, reference=1, progress=False))
    aligned, want = load_model(str(tmp_path / "permuted")).state_dict(), model.state_dict()
    assert sorted(aligned) == sorted(want) and all(torch.equal(aligned[k], want[k]) for k in want)


@pytest.fixture(scope="module")
def switch_source(tmp_path_factory):
    path = tmp_path_factory.mktemp("device-map") / "switch-sharded"
    tiny_switch(seed=3).save_pretrained(path, max_shard_size="60KB")
    return path


def with_labels(batches):
    """Task batches: the decoder reads the shifted labels, padding marked -100."""
    out = []
    for b in batches:
        labels = b["input_ids"][:, :6].clone()
        labels[0, 4:] = -100
        out.append({**b, "labels": labels})
    return out


@pytest.mark.parametrize("options", [dict(), dict(strategy="drop", similarity="weight", layers=[0, 3]),
                                     dict(compress=dict(rank=4, keep_ratio=0.3))],
                         ids=["frequency", "drop-some-layers", "compress"])
@pytest.mark.parametrize("labelled", [False, True], ids=["text", "labels"])
def test_switch_streams_with_a_device_map(switch_source, tmp_path, options, labelled):
    """Switch's encoder and decoder blocks, read one at a time after accelerate ran its own forward
    (the decoder on the final encoder output and the relative position biases), equal the in-memory merge."""
    texts = calibration(tiny_switch(), seed=2, batches=2)
    batches = with_labels(texts) if labelled else texts
    options = dict(options)
    compress = options.pop("compress", None)
    expected = in_memory(switch_source, tmp_path / "expected", batches, compress=compress, **options)
    result = quiet_merge(switch_source, tmp_path / "streamed", batches, NUM_GROUPS, compress=compress,
                         device_map="auto", max_memory="60KB", **options)
    assert result.offloaded
    assert_same_checkpoint(expected, result.path, texts)
    assert set(result.groupings) == ({"encoder.block.1.layer.1.mlp", "decoder.block.3.layer.2.mlp"}
                                     if "layers" in options else set(result.stats))


def test_switch_streamed_permute_equals_align_experts(switch_source, tmp_path):
    from mcsmoe_fast.models.hub import load_model

    perms = permute_checkpoint(switch_source, tmp_path / "permuted", reference=3, max_shard_size="40KB",
                               progress=False)
    model = open_model(str(switch_source))
    expected = align_experts(model, reference=3, progress=False)
    assert perms.keys() == expected.keys() and all(torch.equal(perms[k], expected[k]) for k in perms)
    aligned, want = load_model(str(tmp_path / "permuted")).state_dict(), model.state_dict()
    assert sorted(aligned) == sorted(want) and all(torch.equal(aligned[k], want[k]) for k in want)


def test_bad_device_maps_and_budgets_are_refused(source, batches, tmp_path):
    for bad in ("everywhere", {}, 3):
        with pytest.raises(ValueError, match="device_map"):
            check_device_map(bad)
    for good in (None, "auto", "balanced_low_0", "cpu", "cuda:1", MIXED):
        check_device_map(good)
    with pytest.raises(ValueError, match="needs|pass device_map too"):
        merge_checkpoint(source, tmp_path / "out", batches, NUM_GROUPS, max_memory={"cpu": "1GB"}, progress=False)
    with pytest.raises(ValueError, match="unknown device 'disk'"):
        split_memory({"disk": "1GB"})
    with pytest.raises(ValueError, match=r"max_memory\['cpu'\]"):
        split_memory({"cpu": "lots"})
    assert split_memory({"cuda:1": "2GB", "0": 5, "cpu": "1KB"}) == (1000, {1: 2 * 10**9, 0: 5, "cpu": 1000})
    budget, per_device = split_memory("3KB")
    assert budget == 3000 and per_device["cpu"] == 3000
    assert split_memory(None) == (None, None)
    with pytest.raises(ValueError, match="device_map"):
        merge_checkpoint(source, tmp_path / "out", batches, NUM_GROUPS, device_map="everywhere", progress=False)
    assert not (tmp_path / "out").exists()


def test_cli_merge_with_a_device_map(source, tmp_path, capsys):
    from mcsmoe_fast.cli import main
    from test_cli_merge import LINES, tiny_tokenizer

    (tmp_path / "calib.txt").write_text("\n".join(LINES))
    tiny_tokenizer().save_pretrained(tmp_path / "tok")
    common = ["merge", "--model", str(source), "--calib", str(tmp_path / "calib.txt"), "--tokenizer",
              str(tmp_path / "tok"), "--num-groups", "3"]
    assert main(common + ["--out", str(tmp_path / "out"), "--device-map", json.dumps(MIXED),
                          "--max-memory", "cpu=1GB"]) == 0
    assert "streamed 3 layers" in capsys.readouterr().out
    assert len(json.loads((tmp_path / "out" / "config.json").read_text())["mcsmoe_merge"]["layers"]) == 3
    for out, options, error in (("a", ["--max-memory", "cpu=1GB"], "needs --device-map"),
                                ("b", ["--device-map", "auto", "--max-memory", "cpu=,0=1GB"], "DEVICE=SIZE"),
                                ("c", ["--device-map", "{bad"], "not a JSON object")):
        assert main(common + ["--out", str(tmp_path / out)] + options) != 0
        assert error in capsys.readouterr().err
    assert not any((tmp_path / d).exists() for d in "abc")
    import yaml  # the same settings from a --config file: mappings, not strings

    config = tmp_path / "merge.yaml"
    config.write_text(yaml.safe_dump({"device-map": MIXED, "max-memory": {"cpu": "1GB"}, "out": str(tmp_path / "d")}))
    assert main(common + ["--config", str(config)]) == 0
    assert (tmp_path / "d" / "config.json").is_file()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA: a GPU in the device map")
def test_cuda_device_map_gives_the_same_groups(source, batches, tmp_path):
    expected = in_memory(source, tmp_path / "expected", batches)
    result = quiet_merge(source, tmp_path / "streamed", batches, NUM_GROUPS, device_map="auto",
                         max_memory={0: "1GB", "cpu": "1GB"})
    assert not result.offloaded
    from mcsmoe_fast import from_pretrained, moe_layers

    a, b = from_pretrained(expected), from_pretrained(result.path)
    for la, lb in zip(moe_layers(a), moe_layers(b)):
        assert torch.equal(la.expert_map(), lb.expert_map())
