"""`mcsmoe-fast compare` (compare.py) on a tiny Mixtral: every method at two ratios from one statistics pass,
results.json and the table; each row's perplexity is that of the method run on its own."""
import json
import math

import torch

from mcsmoe_fast import collect_routing_stats
from mcsmoe_fast.cli import main
from mcsmoe_fast.compare import compare_methods
from mcsmoe_fast.models.hub import load_model
from mcsmoe_fast.prune import prune_experts
from mcsmoe_fast.tiny import tiny_mixtral
from mcsmoe_fast.train.text import perplexity
from test_cli_merge import LINES, tiny_tokenizer


def test_compare_command(tmp_path, capsys):
    tiny_mixtral().save_pretrained(tmp_path / "mixtral")
    tiny_tokenizer().save_pretrained(tmp_path / "mixtral")
    (tmp_path / "calib.txt").write_text("\n".join(LINES * 4) + "\n")
    (tmp_path / "eval.txt").write_text(" ".join(LINES * 6))
    args = ["compare", "--model", tmp_path / "mixtral", "--calib", tmp_path / "calib.txt", "--eval-text",
            tmp_path / "eval.txt", "--eval-length", 16, "--ratios", "0.25,0.5", "--out", tmp_path / "out"]
    assert main([str(a) for a in args]) == 0
    out = capsys.readouterr().out
    assert "| reap | 50% | 4 | standard |" in out and "| m-smoe | 25% | 6 | exact |" in out
    result = json.loads((tmp_path / "out" / "results.json").read_text())
    rows = result["rows"]
    assert [r["method"] for r in rows] == ["full"] + ["m-smoe", "hc-smoe", "reap", "ream", "frequency"] * 2
    assert all(math.isfinite(r["perplexity"]) for r in rows)
    assert (tmp_path / "out" / "results.md").read_text().count("\n") == 2 + len(rows)
    bad = args[:-2] + ["--methods", "reap,drop", "--out", tmp_path / "bad"]
    assert main([str(a) for a in bad]) == 2
    assert "unknown or none ['drop']" in capsys.readouterr().err


def test_rows_are_the_methods_themselves(tmp_path):
    model = tiny_mixtral()
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(3, 128, (3, 12), generator=g)} for _ in range(2)]
    batches = [dict(b, attention_mask=torch.ones_like(b["input_ids"])) for b in batches]
    windows = torch.randint(3, 128, (4, 16), generator=g)
    result = compare_methods(model, batches, windows, ["reap", "frequency"], [0.5], progress=False)
    stats = collect_routing_stats(model, batches, saliency="reap", progress=False)
    for row in result["rows"][1:]:
        pruned = prune_experts(model, stats, ratio=0.5, method=row["method"])
        assert row["perplexity"] == perplexity(pruned, windows)
    assert result["rows"][0]["perplexity"] == perplexity(model, windows)
