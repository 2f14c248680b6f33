"""Streamed runs that differed from the in-memory commands or from their own plan: the streamed permute wrote
transformers' in-memory fused names instead of the checkpoint's own (hub) names, the streamed REAP prune's plan
counted none of what the saliency pass holds, and an offload directory that is a file failed late with a bare
"File exists"."""
import contextlib
import io
import re

import pytest
import torch

from mcsmoe_fast.cli import main
from mcsmoe_fast.tiny import tiny_moe
from streaming_helpers import stored


def quiet_main(argv) -> int:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return main(argv)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_streamed_permute_writes_the_in_memory_commands_tensors(family, tmp_path):
    """`permute --max-memory` writes the same tensors under the same names as `permute` in memory
    (model.save_pretrained: the family's hub names, e.g. Mixtral's block_sparse_moe.experts.j.w1.weight)."""
    src = tmp_path / family
    tiny_moe(family, num_layers=2, seed=4).save_pretrained(src, max_shard_size="40KB")
    assert quiet_main(["permute", "--model", str(src), "--out", str(tmp_path / "mem"), "--reference", "1"]) == 0
    assert quiet_main(["permute", "--model", str(src), "--out", str(tmp_path / "streamed"), "--reference", "1",
                       "--max-memory", "1KB"]) == 0
    expected, actual = stored(tmp_path / "mem"), stored(tmp_path / "streamed")
    assert sorted(actual) == sorted(expected)
    assert sorted(expected) == sorted(stored(src))  # the source's own names
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype and torch.equal(actual[name], tensor), name


@pytest.mark.parametrize("run", ["merge", "prune"])
@pytest.mark.parametrize("max_memory", ["1KB", None])
def test_an_offload_dir_that_is_a_file_is_refused_before_any_work(run, max_memory, tmp_path):
    """A file given as offload_dir is refused up front, naming the option (also when the plan would not offload);
    the file and `out` are left alone."""
    from mcsmoe_fast.streaming import merge_checkpoint
    from mcsmoe_fast.streaming.prune import prune_checkpoint

    src = tmp_path / "src"
    tiny_moe("mixtral", num_layers=2).save_pretrained(src)
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    batches = [{"input_ids": torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(0))}]
    common = dict(max_memory=max_memory, offload_dir=notes, progress=False)
    with pytest.raises(ValueError, match=re.escape(f"offload_dir {notes} is a file, not a directory: give a directory")):
        if run == "merge":
            merge_checkpoint(src, tmp_path / "out", batches, 3, **common)
        else:
            prune_checkpoint(src, tmp_path / "out", batches, num_experts=4, **common)
    assert notes.read_text() == "mine" and not (tmp_path / "out").exists()


def test_streamed_perplexity_refuses_an_offload_dir_that_is_a_file(tmp_path):
    from mcsmoe_fast.streaming.perplexity import streamed_perplexity

    tiny_moe("mixtral", num_layers=2).save_pretrained(tmp_path / "src")
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    windows = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="offload_dir .* is a file"):
        streamed_perplexity(tmp_path / "src", windows, max_memory="1KB", offload_dir=notes, progress=False)
    assert notes.read_text() == "mine"


def planned(monkeypatch, module) -> list:
    """The MemoryPlans `module` (streaming.prune or streaming.pipeline) makes, recorded as they are made."""
    plans, plan_memory = [], module.plan_memory
    monkeypatch.setattr(module, "plan_memory", lambda *a, **k: plans.append(plan_memory(*a, **k)) or plans[-1])
    return plans


@pytest.mark.parametrize("run", ["prune", "merge-ream"])
def test_the_plan_counts_what_the_reap_saliency_pass_holds(run, monkeypatch, tmp_path):
    """REAP's saliency (the streamed prune; REAM grouping in the streamed merge) runs every routed (token, expert) pair
    of a batch through the experts: the plan's layer floor counts those rows (tokens x top_k of d), one chunk of
    1024 x top_k of them through the fused op (gathered input, output and combined rows: 3 d; intermediates: 3 ff)
    and the output's float64 copy for the norms (8 d bytes a row); the same run without saliency does not."""
    import mcsmoe_fast.streaming.pipeline as pipeline
    import mcsmoe_fast.streaming.prune as prune

    src = tmp_path / "src"
    model = tiny_moe("mixtral", num_layers=2)
    model.save_pretrained(src)
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(3, 100, shape, generator=g)} for shape in ((2, 7), (3, 5))]
    plans = planned(monkeypatch, prune if run == "prune" else pipeline)
    for i, with_saliency in enumerate((True, False)):
        if run == "prune":
            prune.prune_checkpoint(src, tmp_path / f"out{i}", batches, num_experts=4, max_memory="1GB", progress=False,
                                   method="reap" if with_saliency else "frequency")
        else:
            pipeline.merge_checkpoint(src, tmp_path / f"out{i}", batches, 4, max_memory="1GB", progress=False,
                                      grouping="ream" if with_saliency else "dominant", format="standard",
                                      router="dominant")
    c = model.config
    d, ff, k, tokens = c.hidden_size, c.intermediate_size, c.num_experts_per_tok, 15  # the largest batch: 3 x 5
    rows = tokens * k  # fewer than 1024 tokens: one chunk
    expected = (tokens * k * d + rows * (3 * d + 3 * ff)) * 4 + rows * d * 8
    assert plans[0].layer_floor - plans[1].layer_floor == expected
    assert plans[1].layer_floor == 2 * plans[1].layer_bytes + plans[1].matching_bytes + plans[1].forward_bytes


def test_the_plan_counts_the_weight_similaritys_chunks(monkeypatch, tmp_path):
    """The weight similarity converts the layer's weights to float64 a column chunk at a time: a merge with
    similarity='weight' plans two such chunks more in its layer floor than one on the router logits, and a budget
    between the two floors warns only for the weight similarity."""
    import mcsmoe_fast.streaming.pipeline as pipeline
    from mcsmoe_fast import grouping

    src = tmp_path / "src"
    model = tiny_moe("mixtral", num_layers=2)
    model.save_pretrained(src)
    batches = [{"input_ids": torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(0))}]
    monkeypatch.setattr(grouping, "WEIGHT_GRAM_CHUNK_BYTES", 1 << 12)
    plans = planned(monkeypatch, pipeline)
    for similarity in ("weight", "router-logits"):
        pipeline.merge_checkpoint(src, tmp_path / similarity, batches, 4, similarity=similarity, max_memory="1GB",
                                  progress=False)
    e = model.config.num_local_experts
    step = (1 << 12) // (8 * e)
    assert plans[0].similarity_bytes == 8 * e * (2 * step + 2 * e) > 0
    assert plans[0].layer_floor - plans[1].layer_floor == plans[0].similarity_bytes
    # under a small budget the matching share is budget / 8: the floors are base + B / 8 (+ the chunks); B between
    # 8/7 base and 8/7 (base + chunks) is above the router-logits floor and below the weight similarity's
    base = plans[1].layer_floor - plans[1].matching_bytes
    between = 8 * (base + plans[0].similarity_bytes // 2) // 7
    with pytest.warns(UserWarning, match="below what merging one layer needs"):
        pipeline.merge_checkpoint(src, tmp_path / "w2", batches, 4, similarity="weight", max_memory=between,
                                  progress=False)
    with warnings_as_errors():
        pipeline.merge_checkpoint(src, tmp_path / "r2", batches, 4, similarity="router-logits", max_memory=between,
                                  progress=False)
    assert plans[-2].layer_floor > between >= plans[-1].layer_floor


@contextlib.contextmanager
def warnings_as_errors():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield
