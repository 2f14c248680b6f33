"""Streamed runs that lost a user's input or differed from the in-memory pipeline: an `out` that reaches the input
through '..' or a symlink (the atomic replace resolves them, so it replaced the input), tied names written as
extra copies by the streamed compression, the tensors transformers keeps in float32 (DeepSeek-V3's router gate
and score-correction bias in bf16, GPT-OSS's norms in fp16) read and written in the working dtype, and the
memory estimate that saw no expert layer in a Switch checkpoint."""
import pytest
import torch

from mcsmoe_fast import collect_routing_stats, compress_experts, merge_experts, open_model, save_pretrained
from mcsmoe_fast.streaming import checkpoint_bytes, compress_checkpoint, merge_checkpoint, permute_checkpoint
from mcsmoe_fast.tiny import tiny_mixtral, tiny_moe, tiny_switch
from merge_helpers import calibration
from streaming_helpers import NUM_GROUPS, assert_same_checkpoint, stored


@pytest.fixture(scope="module")
def batches():
    return calibration(tiny_mixtral(num_layers=1), seed=3, batches=2, batch=2, length=9)


@pytest.mark.parametrize("how", ["dotdot", "out_symlink", "source_symlink", "parent_symlink"])
def test_an_out_that_resolves_to_the_input_is_refused_and_the_input_kept(tmp_path, batches, how):
    src = tmp_path / "src"
    tiny_mixtral(num_layers=2, seed=1).save_pretrained(src)
    (tmp_path / "other").mkdir()
    given_src, out = src, tmp_path / "other" / ".." / "src"
    if how == "out_symlink":
        out = tmp_path / "link"
        out.symlink_to(src, target_is_directory=True)
    elif how == "source_symlink":
        given_src = tmp_path / "link"
        given_src.symlink_to(src, target_is_directory=True)
        out = src
    elif how == "parent_symlink":  # out is a directory holding the input
        out = tmp_path / "link"
        out.symlink_to(tmp_path, target_is_directory=True)
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    runs = [lambda: merge_checkpoint(given_src, out, batches, NUM_GROUPS, globally=False, progress=False),
            lambda: permute_checkpoint(given_src, out, progress=False)]
    for run in runs:
        with pytest.raises(ValueError, match=r"out \(.*\) (must not be the input checkpoint|holds the input)"):
            run()
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before
    merged = tmp_path / "merged"
    merge_checkpoint(src, merged, batches, NUM_GROUPS, globally=False, progress=False)
    before = {p.name: p.read_bytes() for p in merged.iterdir()}
    link = tmp_path / "merged_link"
    link.symlink_to(merged, target_is_directory=True)
    with pytest.raises(ValueError, match="must not be the input checkpoint"):
        compress_checkpoint(merged, link, rank=2, keep_ratio=0.3, progress=False)
    assert {p.name: p.read_bytes() for p in merged.iterdir()} == before


@pytest.mark.parametrize("family", ["mixtral", "switch"])
def test_streamed_compression_keeps_tied_names_aliases_as_in_memory(tmp_path, batches, family):
    model = tiny_switch(num_layers=2, seed=1) if family == "switch" else tiny_mixtral(num_layers=2, seed=1)
    if family == "mixtral":
        model.config.tie_word_embeddings = True
        model.tie_weights()
    model.save_pretrained(tmp_path / "src")
    model = open_model(str(tmp_path / "src"))
    calib = calibration(model, seed=3, batches=2, batch=2, length=9)
    merge_experts(model, collect_routing_stats(model, calib, progress=False), NUM_GROUPS, globally=False,
                  progress=False)
    merged = save_pretrained(model, tmp_path / "merged")
    compress_checkpoint(merged, tmp_path / "streamed", rank=3, keep_ratio=0.3, progress=False)
    compress_experts(model, rank=3, keep_ratio=0.3, importance="weight", progress=False)
    expected = save_pretrained(model, tmp_path / "in_memory")
    assert sorted(stored(tmp_path / "streamed")) == sorted(stored(expected))
    assert_same_checkpoint(expected, tmp_path / "streamed", calib)


@pytest.mark.parametrize("family,dtype,kept", [("deepseek_v3", torch.bfloat16, ".mlp.gate."),
                                               ("gpt_oss", torch.float16, "norm.weight")])
def test_tensors_transformers_keeps_in_float32_stay_float32_when_streamed(tmp_path, batches, family, dtype, kept):
    model = tiny_moe(family, num_layers=2, seed=1)
    with torch.no_grad():  # a score-correction bias whose float32 values bfloat16 cannot tell apart
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(64 + 0.15 * torch.arange(buf.numel()))
    model.save_pretrained(tmp_path / "src", max_shard_size="40KB")
    in_memory = open_model(str(tmp_path / "src"), dtype=dtype)
    assert any(kept in n and t.dtype == torch.float32 for n, t in in_memory.state_dict().items())
    stats = collect_routing_stats(in_memory, batches, bases=("router-logits", "feature"), progress=False)
    merge_experts(in_memory, stats, NUM_GROUPS, globally=False, progress=False)
    expected = stored(save_pretrained(in_memory, tmp_path / "in_memory"))
    result = merge_checkpoint(tmp_path / "src", tmp_path / "streamed", batches, NUM_GROUPS, globally=False,
                              progress=False, dtype=dtype)
    for name in stats:
        assert torch.equal(result.stats[name].frequency, stats[name].frequency), name
    streamed = stored(result.path)
    assert sorted(streamed) == sorted(expected)
    for name, t in expected.items():
        assert streamed[name].dtype == t.dtype and torch.equal(streamed[name], t), name
    compressed = tmp_path / "compressed"
    compress_checkpoint(result.path, compressed, rank=2, keep_ratio=0.3, dtype=dtype, progress=False)
    float32 = {n for n, t in expected.items() if t.dtype == torch.float32}
    assert float32 and all(stored(compressed)[n].dtype == torch.float32 for n in float32)


def test_the_memory_estimate_sees_the_expert_layers_of_switch(tmp_path):
    tiny_switch(num_layers=4, seed=1).save_pretrained(tmp_path / "switch")
    total, largest = checkpoint_bytes(tmp_path / "switch")
    sizes = {}
    for name, t in stored(tmp_path / "switch").items():
        if ".experts." in name:
            block = name.split(".layer.")[0]  # encoder.block.1 and decoder.block.1 are two layers
            sizes[block] = sizes.get(block, 0) + t.numel() * 4
    assert len(sizes) >= 2 and largest == max(sizes.values())
    assert total == sum(t.numel() * 4 for t in stored(tmp_path / "switch").values())


def test_a_merged_checkpoint_loaded_in_bf16_keeps_the_float32_modules_values(tmp_path, batches):
    from mcsmoe_fast import from_pretrained

    model = tiny_moe("deepseek_v3", num_layers=2, seed=1)
    merge_experts(model, collect_routing_stats(model, batches, progress=False), NUM_GROUPS, globally=False,
                  progress=False)
    saved = stored(save_pretrained(model, tmp_path / "merged"))
    loaded = from_pretrained(tmp_path / "merged", dtype=torch.bfloat16).state_dict()
    kept = [n for n in saved if ".mlp.gate." in n]
    assert kept
    for name, t in saved.items():
        if name in kept:  # float32 and exactly the saved values (never rounded through bf16)
            assert loaded[name].dtype == torch.float32 and torch.equal(loaded[name], t), name
        elif t.is_floating_point():
            assert loaded[name].dtype == torch.bfloat16 and torch.equal(loaded[name], t.to(torch.bfloat16)), name
