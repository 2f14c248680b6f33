"""The merges then compressed in `compare` (m-smoe+c, hc-smoe+c, ream+c): each row is the merge of the same
statistics compressed with the given settings, its size the expert parameters it stores (low-rank factors and
kept rows), as a share of the input model's."""
import copy
import json

import pytest
import torch

from mcsmoe_fast import collect_routing_stats
from mcsmoe_fast.checkpoint import to_standard
from mcsmoe_fast.cli import main
from mcsmoe_fast.compare import compare_methods
from mcsmoe_fast.compress import CompressOptions, compress_experts
from mcsmoe_fast.merge import merge_experts
from mcsmoe_fast.ream import ream_experts
from mcsmoe_fast.tiny import tiny_mixtral
from mcsmoe_fast.train.text import perplexity
from test_compare import saved_model_and_texts


def setup():
    model = tiny_mixtral()
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(3, 128, (3, 12), generator=g)} for _ in range(2)]
    return model, batches, torch.randint(3, 128, (4, 16), generator=g)


def merged_then_compressed(model, batches, method, opts):
    stats = collect_routing_stats(model, batches, bases=("router-logits", "feature", "expert-output"),
                                  saliency="reap", progress=False)
    reduced = copy.deepcopy(model)
    if method == "ream+c":
        ream_experts(reduced, stats, num_experts=4, progress=False)
        reduced = to_standard(reduced, router="dominant")
    else:
        options = (dict(similarity="router-logits") if method == "m-smoe+c"
                   else dict(similarity="expert-output", grouping="hierarchical"))
        merge_experts(reduced, stats, 4, globally=False, progress=False, **options)
    norms = collect_routing_stats(reduced, batches, input_norms=True, progress=False) \
        if opts.importance == "activation" else None
    compress_experts(reduced, rank=opts.rank, keep_ratio=opts.keep_ratio, importance=opts.importance, stats=norms,
                     progress=False)
    return reduced


@pytest.mark.parametrize("opts", [CompressOptions(rank=4, keep_ratio=0.2),
                                  CompressOptions(rank=2, keep_ratio=0.05, importance="activation")])
def test_compressed_rows_are_the_merge_compressed(opts):
    model, batches, windows = setup()
    cfg = model.config
    d, ff, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    full = layers * cfg.num_local_experts * 3 * d * ff
    methods = ["m-smoe", "m-smoe+c", "hc-smoe+c", "ream+c"]
    result = compare_methods(model, batches, windows, methods, [0.5], progress=False, compress=opts)
    rows = {r["method"]: r for r in result["rows"]}
    assert rows["full"]["expert_params"] == full and rows["m-smoe"]["expert_share"] == 0.5
    for method in methods[1:]:
        row = rows[method]
        assert row["form"] == ("standard, compressed" if method == "ream+c" else "exact, compressed")
        want = merged_then_compressed(model, batches, method, opts)
        assert row["perplexity"] == pytest.approx(perplexity(want, windows), rel=1e-6), method
        # 4 slots a layer; each has w_in [2 ff, d] and w_out [d, ff] as r-rank factors plus kept entries of S
        low_rank = layers * 4 * opts.rank * ((2 * ff + d) + (d + ff))
        sparse = row["expert_params"] - low_rank
        budget = opts.keep_ratio * layers * 4 * 3 * d * ff
        assert budget - max(d, ff) <= sparse <= budget, method
        assert row["expert_share"] == row["expert_params"] / full


def test_compress_settings_reach_the_rows():
    model, batches, windows = setup()
    a = compare_methods(model, batches, windows, ["m-smoe+c"], [0.5], progress=False,
                        compress=CompressOptions(rank=4, keep_ratio=0.2))["rows"][1]
    b = compare_methods(model, batches, windows, ["m-smoe+c"], [0.5], progress=False,
                        compress=CompressOptions(rank=4, keep_ratio=0.2, importance="activation"))["rows"][1]
    c = compare_methods(model, batches, windows, ["m-smoe+c"], [0.5], progress=False)["rows"][1]  # rank 32, keep 10%
    assert a["expert_params"] == b["expert_params"] and a["perplexity"] != b["perplexity"]
    assert c["expert_params"] != a["expert_params"]
    with pytest.raises(ValueError, match="prunes during fine-tuning"):
        compare_methods(model, batches, windows, ["m-smoe+c"], [0.5], compress=CompressOptions(importance="gradient"))


def test_compare_command_compressed(tmp_path, capsys):
    saved_model_and_texts(tmp_path)
    args = ["compare", "--model", tmp_path / "mixtral", "--calib", tmp_path / "calib.txt", "--eval-text",
            tmp_path / "eval.txt", "--eval-length", 16, "--methods", "m-smoe,m-smoe+c", "--ratios", "0.5",
            "--compress-rank", 3, "--compress-keep-ratio", 0.3, "--compress-importance", "activation",
            "--out", tmp_path / "out"]
    assert main([str(a) for a in args]) == 0
    assert "| m-smoe+c | 50% | 4 |" in capsys.readouterr().out
    rows = json.loads((tmp_path / "out" / "results.json").read_text())["rows"]
    cfg = tiny_mixtral().config
    d, ff, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    sparse = rows[2]["expert_params"] - layers * 4 * 3 * ((2 * ff + d) + (d + ff))
    assert 0.3 * layers * 4 * 3 * d * ff - max(d, ff) <= sparse <= 0.3 * layers * 4 * 3 * d * ff
    plain = args[:args.index("--methods")] + ["--methods", "m-smoe", "--compress-rank", 3, "--out", tmp_path / "o2"]
    assert main([str(a) for a in plain]) == 2
    assert "--compress-rank set the compressed methods' settings, but --methods names none" in capsys.readouterr().err
