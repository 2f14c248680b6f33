"""Streaming merge (mcsmoe_fast.streaming): layer by layer from sharded safetensors, equal to the
in-memory pipeline; sharded merged checkpoints; clean errors for bad shards; atomic output; one
layer in memory at a time."""
import gc
import json
import os

import pytest
import torch
from safetensors.torch import save_file

import mcsmoe_fast.merge as merge_module
import mcsmoe_fast.streaming.passes as passes
import mcsmoe_fast.streaming.skeleton as skeleton
from mcsmoe_fast import (
    collect_routing_stats, compress_experts, from_pretrained, merge_experts, moe_layers, open_model, save_pretrained,
)
from mcsmoe_fast.checkpoint import CheckpointError
from mcsmoe_fast.streaming import checkpoint_bytes, fits_in_memory, in_memory_bytes, merge_checkpoint
from mcsmoe_fast.tiny import tiny_mixtral, tiny_switch
from merge_helpers import calibration, forward
from streaming_helpers import NUM_GROUPS, assert_same_checkpoint, in_memory, quiet_merge

COMPRESS = dict(rank=4, keep_ratio=0.3)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A tiny 3-layer Mixtral saved by transformers in 11 shards (per-expert w1/w2/w3 layout)."""
    path = tmp_path_factory.mktemp("streaming") / "mixtral-sharded"
    model = tiny_mixtral(num_layers=3, seed=1)
    model.save_pretrained(path, max_shard_size="50KB")
    assert len(json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]) > 30
    return path


@pytest.fixture(scope="module")
def batches(source):
    return calibration(tiny_mixtral(num_layers=1), seed=3, batches=3, batch=2, length=9)


@pytest.mark.parametrize("globally", [True, False], ids=["global-two-passes", "per-layer-one-pass"])
@pytest.mark.parametrize("offload", [False, True], ids=["in-memory-activations", "offloaded-activations"])
def test_streamed_merge_equals_in_memory_pipeline(source, batches, tmp_path, globally, offload):
    expected = in_memory(source, tmp_path / "expected", batches, globally=globally)
    acts = tmp_path / "acts"
    result = quiet_merge(source, tmp_path / "streamed", batches, NUM_GROUPS, globally=globally,
                         max_memory="1KB" if offload else None, offload_dir=acts if offload else None,
                         max_shard_size="30KB")
    assert result.offloaded is offload
    assert result.passes == (2 if globally else 1)
    assert_same_checkpoint(expected, result.path, batches)
    assert (result.path / "mcsmoe_model.safetensors.index.json").is_file()  # sharded output
    assert not offload or list(acts.iterdir()) == []  # the activation file is removed
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["expected", "streamed"] + (["acts"] if offload else []))
    merged = json.loads((result.path / "config.json").read_text())["mcsmoe_merge"]["layers"]
    for name, g in result.groupings.items():
        assert merged[name]["expert_map"] == g.expert_map


@pytest.mark.parametrize("grouping", ["dominant", "hierarchical"])
def test_streamed_merge_on_expert_outputs_equals_in_memory(source, batches, tmp_path, grouping):
    """The expert-output basis reads the layer's w_out when its statistics are finished: that has to happen before
    the layer is emptied again (after, it raised "Cannot copy out of meta tensor")."""
    kwargs = dict(similarity="expert-output", grouping=grouping, globally=False)
    expected = in_memory(source, tmp_path / "expected", batches, **kwargs)
    result = quiet_merge(source, tmp_path / "streamed", batches, NUM_GROUPS, **kwargs)
    assert_same_checkpoint(expected, result.path, batches)


def test_streamed_merge_and_compress_equals_in_memory_pipeline(source, batches, tmp_path):
    expected = in_memory(source, tmp_path / "expected", batches, compress=COMPRESS)
    result = quiet_merge(source, tmp_path / "streamed", batches, NUM_GROUPS, compress=COMPRESS,
                         max_memory="1KB", offload_dir=tmp_path / "acts", max_shard_size="20KB")
    assert_same_checkpoint(expected, result.path, batches)
    assert not (result.path / ".compress-staging").exists()
    entry = next(iter(json.loads((result.path / "config.json").read_text())["mcsmoe_merge"]["layers"].values()))
    assert entry["compressed"]["rank_in"] == COMPRESS["rank"]


def test_drop_strategy_and_a_subset_of_layers_equal_in_memory(source, batches, tmp_path):
    kwargs = dict(strategy="drop", layers=[0, 2], similarity="weight")
    expected = in_memory(source, tmp_path / "expected", batches, **kwargs)
    result = quiet_merge(source, tmp_path / "streamed", batches, NUM_GROUPS, **kwargs)
    assert set(result.groupings) == {"model.layers.0.mlp", "model.layers.2.mlp"}
    assert_same_checkpoint(expected, result.path, batches)


def test_single_file_and_fused_layout_sources(batches, tmp_path):
    model = tiny_mixtral(num_layers=2, seed=2)
    model.save_pretrained(tmp_path / "single")  # one model.safetensors, per-expert names
    fused = tmp_path / "fused"  # the model's own names: mlp.experts.gate_up_proj / down_proj
    model.config.save_pretrained(fused)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(fused / "model.safetensors"))
    assert not (tmp_path / "single" / "model.safetensors.index.json").exists()
    expected = in_memory(tmp_path / "single", tmp_path / "expected", batches)
    for src in ("single", "fused"):
        result = quiet_merge(tmp_path / src, tmp_path / f"out-{src}", batches, NUM_GROUPS)
        assert_same_checkpoint(expected, result.path, batches)


@pytest.mark.parametrize("family", ["qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss"])
def test_other_families_stream_like_the_in_memory_pipeline(family, batches, tmp_path):
    """The generic adapter's families the cut forward runs: Qwen2-MoE's and DeepSeek-V3's shared experts
    and DeepSeek-V3's dense first layer are copied through; the per-layer-type masks (Qwen2-MoE, GPT-OSS's
    sliding layers with sinks), MLA attention and GPT-OSS's transposed, interleaved, biased experts with
    their clamped SwiGLU match the in-memory pipeline."""
    from mcsmoe_fast.tiny import tiny_moe

    src = tmp_path / family
    tiny_moe(family, num_layers=3, seed=4).save_pretrained(src, max_shard_size="60KB")
    assert (src / "model.safetensors.index.json").is_file()
    expected = in_memory(src, tmp_path / "expected", batches)
    result = quiet_merge(src, tmp_path / "streamed", batches, NUM_GROUPS, max_shard_size="30KB")
    assert_same_checkpoint(expected, result.path, batches)


def test_streamed_drop_on_a_qwen_gate_equals_in_memory(batches, tmp_path):
    from mcsmoe_fast.tiny import tiny_moe

    src = tmp_path / "qwen3"
    tiny_moe("qwen3_moe", num_layers=2, seed=7, norm_topk_prob=True).save_pretrained(src, max_shard_size="60KB")
    kwargs = dict(strategy="drop", similarity="weight")
    expected = in_memory(src, tmp_path / "expected", batches, **kwargs)
    result = quiet_merge(src, tmp_path / "streamed", batches, NUM_GROUPS, **kwargs)
    assert_same_checkpoint(expected, result.path, batches)
    assert json.loads((result.path / "config.json").read_text())["mcsmoe_merge"]["layers"]["model.layers.0.mlp"]["dropped"]


def test_streamed_merge_and_compress_of_biased_experts_equals_in_memory(batches, tmp_path):
    from mcsmoe_fast.tiny import tiny_moe

    src = tmp_path / "gpt-oss"
    tiny_moe("gpt_oss", num_layers=3, seed=6).save_pretrained(src, max_shard_size="60KB")
    expected = in_memory(src, tmp_path / "expected", batches, compress=COMPRESS)
    result = quiet_merge(src, tmp_path / "streamed", batches, NUM_GROUPS, compress=COMPRESS)
    assert_same_checkpoint(expected, result.path, batches)
    assert any(k.endswith("experts.b_in") for k in from_pretrained(result.path).state_dict())


def test_what_streaming_cannot_do_is_refused_before_any_work(tmp_path, batches):
    from transformers import LlamaConfig, LlamaForCausalLM

    from mcsmoe_fast.tiny import tiny_moe

    LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=4)).save_pretrained(tmp_path / "llama")
    with pytest.raises(ValueError, match="streaming supports checkpoints of model_type .*got 'llama'"):
        merge_checkpoint(tmp_path / "llama", tmp_path / "out", batches, 2)
    tiny_moe("gpt_oss", num_layers=2).save_pretrained(tmp_path / "gpt-oss")
    from safetensors.torch import load_file

    quantized = tmp_path / "gpt-oss-mxfp4"  # the hub release's layout: experts as MXFP4 blocks and scales
    quantized.mkdir()
    (quantized / "config.json").write_text((tmp_path / "gpt-oss" / "config.json").read_text())
    tensors = load_file(str(tmp_path / "gpt-oss" / "model.safetensors"))
    save_file({(k + "_blocks" if k.endswith("experts.gate_up_proj") else k): v for k, v in tensors.items()},
              str(quantized / "model.safetensors"))
    with pytest.raises(CheckpointError, match="quantized expert weights .*gate_up_proj_blocks"):
        merge_checkpoint(quantized, tmp_path / "out", batches, 2)
    with pytest.raises(ValueError, match="drop baseline masks router logits of Switch's router and softmax top-k"):
        merge_checkpoint(tmp_path / "gpt-oss", tmp_path / "out", batches, 2, strategy="drop", similarity="weight")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "gpt_oss"])
def test_streamed_permute_equals_align_experts_then_save(family, tmp_path):
    from mcsmoe_fast import align_experts
    from mcsmoe_fast.models.hub import load_model
    from mcsmoe_fast.streaming import permute_checkpoint
    from mcsmoe_fast.tiny import tiny_moe

    src = tmp_path / family
    tiny_moe(family, num_layers=3, seed=5).save_pretrained(src, max_shard_size="60KB")
    perms = permute_checkpoint(src, tmp_path / "streamed", reference=2, max_shard_size="40KB", progress=False)
    model = open_model(str(src))
    expected = align_experts(model, reference=2, progress=False)
    assert perms.keys() == expected.keys() and all(torch.equal(perms[k], expected[k]) for k in perms)
    index = json.loads((tmp_path / "streamed" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded, with transformers' index
    aligned = load_model(str(tmp_path / "streamed")).state_dict()
    want = model.state_dict()
    assert sorted(aligned) == sorted(want) and all(torch.equal(aligned[k], want[k]) for k in want)
    with pytest.raises(ValueError, match="reference expert 8 out of range"):
        permute_checkpoint(src, tmp_path / "bad", reference=8, progress=False)
    assert not (tmp_path / "bad").exists()


def test_hidden_states_match_the_full_model_layer_by_layer(source, batches):
    """The cut forward pass (streaming/forward.py) reproduces model(**batch) exactly."""
    from mcsmoe_fast.streaming.forward import prepare_batches, run_layer

    model = open_model(str(source))
    prepared = prepare_batches(batches, model.config.vocab_size)
    with torch.no_grad():
        hidden = [model.model.embed_tokens(b.input_ids) for b in prepared]
        full = [model(**b, output_hidden_states=True).hidden_states for b in batches]
        for i, layer in enumerate(model.model.layers[:-1]):  # the last entry is after the final norm
            run_layer(model, layer, i, prepared, hidden.__getitem__, hidden.__setitem__)
            for b in range(len(batches)):
                assert torch.equal(hidden[b], full[b][i + 1])


# --- memory -------------------------------------------------------------------------------------------
def live_tensor_bytes() -> int:
    """Bytes of every distinct CPU storage held by a live tensor (plain tensors and parameters; fake
    tensors other tests' torch.compile runs leave behind have no storage)."""
    seen, total = set(), 0
    for obj in gc.get_objects():
        if type(obj) in (torch.Tensor, torch.nn.Parameter) and obj.device.type == "cpu":
            try:
                storage = obj.untyped_storage()
                ptr = storage.data_ptr()
            except RuntimeError:
                continue
            if ptr not in seen:
                seen.add(ptr)
                total += storage.nbytes()
    return total


def test_only_one_layer_is_materialised_at_a_time(tmp_path, batches, monkeypatch):
    src = tmp_path / "src"
    tiny_mixtral(num_layers=4, hidden_size=32, intermediate_size=256, seed=4).save_pretrained(src, max_shard_size="100KB")
    total, layer_experts = checkpoint_bytes(src)
    model_box, peaks, layers_live = {}, [], []
    baseline = live_tensor_bytes()

    real_build, real_materialise = skeleton.build_skeleton, passes.materialise

    def build(*args):
        model_box["model"] = real_build(*args)
        return model_box["model"]

    def materialise(module, prefix, tensors):
        real_materialise(module, prefix, tensors)
        layers = model_box["model"].model.layers
        layers_live.append([i for i, layer in enumerate(layers)
                            if any(p.device.type != "meta" for p in layer.parameters())])
        peaks.append(live_tensor_bytes() - baseline)

    monkeypatch.setattr(skeleton, "build_skeleton", build)
    monkeypatch.setattr(passes, "materialise", materialise)
    result = merge_checkpoint(src, tmp_path / "out", batches, 2, max_shard_size="20KB", progress=False)
    assert layers_live == [[], [0], [1], [2], [3]]  # embeddings, then one decoder layer at a time
    assert max(peaks) < 1.5 * layer_experts < total / 2, (max(peaks), layer_experts, total)
    # every tensor is read once in pass 1, the routers and experts once more in pass 2
    routers = 4 * 8 * 32 * 4
    assert result.bytes_read == total + 4 * layer_experts + routers
    assert result.peak_rss > 0


def test_fits_in_memory(source):
    total, layer = checkpoint_bytes(source)
    assert in_memory_bytes(source) == 2 * total + int(2.5 * layer)  # fp32 on disk: mapped pages + parameters
    assert in_memory_bytes(source, torch.float64) == 3 * total + int(5 * layer)
    assert fits_in_memory(source, 10 * total)
    assert not fits_in_memory(source, 2 * total)
    assert fits_in_memory(source, None)
    assert fits_in_memory("someone/some-hub-model", 1)  # unknown size: the in-memory path is kept


def test_progress_bars_show_layer_tokens_and_memory(source, batches, tmp_path, capsys):
    merge_checkpoint(source, tmp_path / "out", batches, NUM_GROUPS, progress=True)
    err = capsys.readouterr().err
    assert "pass 1/2: routing statistics" in err and "pass 2/2: merging" in err
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    assert f"{tokens} tokens" in err and "rss " in err and "model.layers.2" in err


# --- errors and interruptions ---------------------------------------------------------------------------
def copy_dir(src, dst):
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def shard_of(path, tensor="model.layers.1.self_attn.q_proj.weight"):
    return json.loads((path / "model.safetensors.index.json").read_text())["weight_map"][tensor]


def test_missing_shard_is_named(source, batches, tmp_path):
    src = copy_dir(source, tmp_path / "src")
    shard = shard_of(src)
    os.remove(src / shard)
    with pytest.raises(CheckpointError, match=f"{shard}.*missing"):
        merge_checkpoint(src, tmp_path / "out", batches, NUM_GROUPS, progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("cut", [10, 5000], ids=["header-cut", "data-cut"])
def test_truncated_shard_is_named(source, batches, tmp_path, cut):
    src = copy_dir(source, tmp_path / "src")
    shard = src / shard_of(src)
    shard.write_bytes(shard.read_bytes()[:cut])
    with pytest.raises(CheckpointError, match=f"{shard.name}.*(truncated|unreadable)"):
        merge_checkpoint(src, tmp_path / "out", batches, NUM_GROUPS, progress=False)
    assert not (tmp_path / "out").exists()


def test_shard_that_does_not_match_the_index_is_named(source, batches, tmp_path):
    src = copy_dir(source, tmp_path / "src")
    index = json.loads((src / "model.safetensors.index.json").read_text())
    tensor = "model.layers.1.self_attn.q_proj.weight"
    right = index["weight_map"][tensor]
    wrong = next(f for f in sorted(set(index["weight_map"].values())) if f != right)
    index["weight_map"][tensor] = wrong
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"{wrong}.*lacks.*q_proj"):
        merge_checkpoint(src, tmp_path / "out", batches, NUM_GROUPS, progress=False)
    # a tensor of the wrong shape (the index is right, the shard holds something else)
    src2 = copy_dir(source, tmp_path / "src2")
    shard = src2 / right
    from mcsmoe_fast.checkpoint.weight_files import WeightFiles

    files = WeightFiles(src2, single=right)
    tensors = {k: files.get(k) for k in files.shapes}
    files.release()
    tensors[tensor] = torch.zeros(3, 3)
    save_file(tensors, str(shard))
    with pytest.raises(CheckpointError, match=f"wrong shape.*q_proj.*{right}"):
        merge_checkpoint(src2, tmp_path / "out", batches, NUM_GROUPS, progress=False)


def test_interrupted_run_leaves_no_output_and_a_rerun_works(source, batches, tmp_path, monkeypatch):
    real = merge_module.merge_layer_weights
    calls = []

    def failing(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated interruption in pass 2")
        return real(*args, **kwargs)

    monkeypatch.setattr(merge_module, "merge_layer_weights", failing)
    acts = tmp_path / "acts"
    with pytest.raises(KeyboardInterrupt):
        quiet_merge(source, tmp_path / "out", batches, NUM_GROUPS, max_memory="1KB", offload_dir=acts,
                    compress=COMPRESS, max_shard_size="20KB")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["acts"]  # no output, no temporary directory
    assert list(acts.iterdir()) == []
    monkeypatch.setattr(merge_module, "merge_layer_weights", real)
    expected = in_memory(source, tmp_path / "expected", batches, compress=COMPRESS)
    result = quiet_merge(source, tmp_path / "out", batches, NUM_GROUPS, max_memory="1KB", offload_dir=acts,
                         compress=COMPRESS, max_shard_size="20KB")
    assert_same_checkpoint(expected, result.path, batches)
    quiet_merge(source, tmp_path / "out", batches, NUM_GROUPS, compress=COMPRESS)  # replaces the previous output
    assert_same_checkpoint(expected, result.path, batches)


def test_refuses_what_it_cannot_stream(source, batches, tmp_path):
    switch = tmp_path / "switch"
    tiny_switch().save_pretrained(switch)
    with pytest.raises(ValueError, match="Switch's encoder-decoder.*pass device_map"):
        merge_checkpoint(switch, tmp_path / "out", batches, 2, progress=False)
    merged = quiet_merge(source, tmp_path / "merged", batches, NUM_GROUPS).path
    with pytest.raises(ValueError, match="already a merged"):
        merge_checkpoint(merged, tmp_path / "again", batches, 2, progress=False)
    with pytest.raises(ValueError, match="must not be the input"):
        merge_checkpoint(source, source, batches, 2, progress=False)
    with pytest.raises(ValueError, match="importance"):
        merge_checkpoint(source, tmp_path / "o", batches, 2, compress=dict(rank=4, importance="activation"))
    with pytest.raises(ValueError, match="max_memory"):
        merge_checkpoint(source, tmp_path / "o", batches, 2, max_memory="lots")
    with pytest.raises(ValueError, match="unsupported inputs"):
        merge_checkpoint(source, tmp_path / "o", [{"input_ids": batches[0]["input_ids"], "pixel_values": 1}], 2)
    assert not (tmp_path / "o").exists()


# --- sharded merged checkpoints (checkpoint.py) -----------------------------------------------------------
@pytest.fixture
def sharded(source, batches, tmp_path):
    model = open_model(str(source))
    merge_experts(model, collect_routing_stats(model, batches, progress=False), NUM_GROUPS, progress=False)
    return model, save_pretrained(model, tmp_path / "sharded", max_shard_size="25KB")


def test_save_pretrained_shards_and_loads_back_exactly(sharded, batches):
    model, path = sharded
    section = json.loads((path / "config.json").read_text())["mcsmoe_merge"]
    assert section["format_version"] == 2 and section["weights"] == "mcsmoe_model.safetensors.index.json"
    shards = sorted(p.name for p in path.glob("mcsmoe_model-*.safetensors"))
    assert len(shards) > 3 and sorted(section["shards"]) == shards
    from mcsmoe_fast.checkpoint.weight_files import WeightFiles

    for shard in shards:  # at most 25 KB of tensors, unless one tensor alone is larger
        files = WeightFiles(path, single=shard)
        assert sum(files.nbytes(k) for k in files.shapes) <= 25_000 or len(files.shapes) == 1
    loaded = from_pretrained(path)
    for x in batches:
        assert torch.equal(forward(loaded, x), forward(model, x))


def test_sharded_checkpoint_errors_name_the_shard(sharded):
    _, path = sharded
    shard = sorted(path.glob("mcsmoe_model-*.safetensors"))[1]
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{shard.name}.*sha256"):
        from_pretrained(path)
    from_pretrained(path, verify=False)  # sizes still match: loads (the bytes are not checked)
    shard.write_bytes(bytes(data[:-100]))
    with pytest.raises(CheckpointError, match=f"{shard.name}.*truncated"):
        from_pretrained(path, verify=False)
    os.remove(shard)
    with pytest.raises(CheckpointError, match=f"{shard.name} is missing"):
        from_pretrained(path, verify=False)


@pytest.mark.parametrize("family", ["mixtral", "switch", "gpt_oss"])
def test_streamed_compress_equals_compress_experts_then_save(family, tmp_path):
    """compress_checkpoint on a sharded merged checkpoint (Switch too: no forward pass is needed; GPT-OSS's
    biases stay dense) equals from_pretrained -> compress_experts(importance="weight") -> save_pretrained."""
    from merge_helpers import build

    from mcsmoe_fast.streaming import compress_checkpoint

    model = build(family, tmp_path)
    data = calibration(model, seed=1)
    merge_experts(model, collect_routing_stats(model, data, progress=False), NUM_GROUPS, progress=False,
                  **({"strategy": "drop"} if family == "mixtral" else {}))
    merged = save_pretrained(model, tmp_path / "merged", max_shard_size="30KB")
    expected = from_pretrained(merged)
    compress_experts(expected, **COMPRESS, importance="weight", progress=False)
    save_pretrained(expected, tmp_path / "expected")
    entries = compress_checkpoint(merged, tmp_path / "streamed", **COMPRESS, max_shard_size="20KB", progress=False)
    assert set(entries) == {layer.name for layer in moe_layers(expected)}
    assert_same_checkpoint(tmp_path / "expected", tmp_path / "streamed", data)
    assert (tmp_path / "streamed" / "mcsmoe_model.safetensors.index.json").is_file()
    assert not (tmp_path / "streamed" / ".compress-staging").exists()
    with pytest.raises(ValueError, match="already compressed"):
        compress_checkpoint(tmp_path / "streamed", tmp_path / "again", progress=False)
    with pytest.raises(ValueError, match="plain transformers checkpoint"):
        compress_checkpoint(tmp_path / f"{family}-base", tmp_path / "plain", progress=False)
    assert not (tmp_path / "again").exists() and not (tmp_path / "plain").exists()
