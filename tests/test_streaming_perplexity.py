"""streamed_perplexity (streaming/perplexity.py): one decoder layer in memory at a time, the number
train.text.perplexity gives on the model in memory, for every family the layer-by-layer forward runs, with the
hidden states in memory or in a file, tied and untied heads, and clear errors for what it cannot read."""
from __future__ import annotations

import pytest
import torch

import mcsmoe_fast.streaming.skeleton as skeleton
from mcsmoe_fast.streaming.perplexity import streamed_perplexity
from mcsmoe_fast.tiny import tiny_mixtral, tiny_moe
from mcsmoe_fast.train.text import perplexity


def _windows(n=5, length=9, seed=0):
    return torch.randint(3, 128, (n, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss"])
def test_streamed_perplexity_equals_the_model_in_memory(family, tmp_path):
    model = tiny_moe(family)
    model.save_pretrained(tmp_path / family)
    windows = _windows()
    want = perplexity(model, windows)
    assert streamed_perplexity(tmp_path / family, windows, batch_size=2, progress=False) == pytest.approx(want, rel=1e-5)


def test_offloaded_hidden_states_and_a_tied_head(tmp_path):
    model = tiny_moe("mixtral", tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.save_pretrained(tmp_path / "tied")
    windows = _windows(7, 12, seed=1)
    scratch = tmp_path / "scratch"
    got = streamed_perplexity(tmp_path / "tied", windows, max_memory="1KB", offload_dir=scratch, progress=False)
    assert got == pytest.approx(perplexity(model, windows), rel=1e-5)
    assert scratch.is_dir() and list(scratch.iterdir()) == []  # the activation file is removed


def test_one_layer_at_a_time(tmp_path, monkeypatch):
    """Every decoder layer is materialised and emptied again before the next one is read."""
    model = tiny_mixtral(num_layers=3)
    model.save_pretrained(tmp_path / "m")
    live, seen = [], []
    materialise, empty = skeleton.materialise, skeleton.empty

    def counting_materialise(module, prefix, tensors):
        live.append(prefix)
        seen.append(sum(p.startswith("model.layers.") for p in live))
        materialise(module, prefix, tensors)

    def counting_empty(module):
        live.pop()
        empty(module)

    import mcsmoe_fast.streaming.perplexity as streamed
    import mcsmoe_fast.streaming.readers as readers

    monkeypatch.setattr(readers, "materialise", counting_materialise)
    monkeypatch.setattr(streamed, "empty", counting_empty)
    streamed_perplexity(tmp_path / "m", _windows(), progress=False)
    assert max(seen) == 1 and live == []


def test_what_it_cannot_read_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"windows \[N >= 1, L >= 2\]"):
        streamed_perplexity(tmp_path, torch.zeros(3, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        streamed_perplexity(tmp_path, _windows(), batch_size=0)
    tiny_mixtral().save_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match="token id"):
        streamed_perplexity(tmp_path / "m", torch.full((2, 4), 500), progress=False)


@pytest.mark.parametrize("family,strategy", [("mixtral", "drop"), ("gpt_oss", "frequency"),
                                             ("deepseek_v3", "frequency")])
def test_this_packages_merged_and_compressed_checkpoints(family, strategy, tmp_path):
    """Our own format: each merged (or compressed) layer's slots installed before its unit is read; the drop
    baseline's logit mask and GPT-OSS's biases included. Against from_pretrained -> perplexity."""
    import mcsmoe_fast as mf
    from merge_helpers import calibration

    model = tiny_moe(family)
    stats = mf.collect_routing_stats(model, calibration(model, seed=5, batches=2, batch=2, length=7), progress=False)
    mf.merge_experts(model, stats, 4, strategy=strategy, progress=False)
    mf.save_pretrained(model, tmp_path / "merged")
    mf.compress_experts(model, rank=4, keep_ratio=0.3, layers=[0], progress=False)
    mf.save_pretrained(model, tmp_path / "compressed")
    windows = _windows()
    for name in ("merged", "compressed"):
        want = perplexity(mf.from_pretrained(tmp_path / name), windows)
        got = streamed_perplexity(tmp_path / name, windows, max_memory="1KB", offload_dir=tmp_path / "acts",
                                  progress=False)
        assert got == pytest.approx(want, rel=1e-5), name


def test_a_streamed_merge_of_an_fp8_checkpoint(tmp_path):
    """A merged checkpoint that keeps block-FP8 tensors (the streamed merge of an FP8 source): read dequantized."""
    import mcsmoe_fast as mf
    from merge_helpers import calibration
    from test_quantized_merge import FP8

    from mcsmoe_fast.streaming import merge_checkpoint
    from mcsmoe_fast.streaming.quantized import quantize_checkpoint

    tiny_mixtral(num_experts=4, hidden_size=128, intermediate_size=128, seed=6).save_pretrained(tmp_path / "plain")
    quantize_checkpoint(tmp_path / "plain", tmp_path / "fp8", FP8)
    batches = calibration(tiny_mixtral(num_layers=1), seed=5, batches=2, batch=2, length=7)
    merge_checkpoint(tmp_path / "fp8", tmp_path / "merged", batches, 2, progress=False)
    windows = _windows()
    want = perplexity(mf.from_pretrained(tmp_path / "merged"), windows)
    assert streamed_perplexity(tmp_path / "merged", windows, progress=False) == pytest.approx(want, rel=1e-5)
    assert streamed_perplexity(tmp_path / "fp8", windows, progress=False) == pytest.approx(
        perplexity(mf.open_model(str(tmp_path / "fp8")), windows), rel=1e-4)


def test_the_working_dtype(tmp_path):
    """dtype=: the layers run in it (bfloat16 here, as the model in memory converted to bfloat16 computes it)."""
    model = tiny_mixtral()
    model.save_pretrained(tmp_path / "m")
    windows = _windows()
    fp32 = streamed_perplexity(tmp_path / "m", windows, progress=False)
    bf16 = streamed_perplexity(tmp_path / "m", windows, dtype=torch.bfloat16, progress=False)
    assert bf16 == pytest.approx(perplexity(model.to(torch.bfloat16), windows), rel=1e-4)
    assert bf16 != fp32
