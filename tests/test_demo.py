"""`mcsmoe-fast demo`: the recipe on a model it trains (a tiny plan here, for speed): fair step counts,
the table, results.json, the plot and checkpoints that load back; the output directory is guarded."""
import json

import pytest
import torch

from mcsmoe_fast import from_pretrained
from mcsmoe_fast.demo import run_demo
from mcsmoe_fast.demo.corpus import is_held_out, split_corpus, stdlib_files
from mcsmoe_fast.train.text import Windows, perplexity
from mcsmoe_fast.demo.recipe import DemoPlan

TINY = DemoPlan(hidden_size=32, intermediate_size=64, heads=2, length=32, batch_size=8, steps=24, recover_steps=8,
                learning_rate=1e-2, kd_learning_rate=5e-3, warmup_steps=4, rank=4, calibration_windows=16,
                eval_windows=8, compare_kd_steps=None)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    lines = []
    rows = run_demo(out, plan=TINY, progress=False, print_fn=lines.append)
    return out, rows, "\n".join(lines)


def test_rows_are_fair_and_complete(demo_run):
    out, rows, text = demo_run
    mc = ("MC-SMoE one-shot + KD", "MC-SMoE pruned during KD")
    assert list(rows) == ["full", "random groups, uniform average", "M-SMoE", "M-SMoE + KD", *mc]
    assert all(r["steps"] <= rows["full"]["steps"] == TINY.steps for r in rows.values())
    assert rows["M-SMoE"]["steps"] == TINY.steps - TINY.recover_steps
    assert rows["M-SMoE + KD"]["steps"] == rows[mc[0]]["steps"] == rows[mc[1]]["steps"] == TINY.steps
    assert rows["M-SMoE"]["expert_share"] == pytest.approx(TINY.groups / TINY.experts)
    for name in mc:
        assert rows[name]["expert_params"] < rows["M-SMoE"]["expert_params"] < rows["full"]["expert_params"]
        assert rows[name]["checkpoint_mb"] < rows["M-SMoE"]["checkpoint_mb"] < rows["full"]["checkpoint_mb"]
    # both keep about keep_ratio of the sparse residual: the same budget, chosen by magnitude or by importance
    assert rows[mc[1]]["expert_params"] == pytest.approx(rows[mc[0]]["expert_params"], rel=0.02)
    assert rows["full"]["perplexity"] < 256 / 4, "the full model learned something about bytes of Python source"
    for name, r in rows.items():
        assert r["vs_full"] == pytest.approx(r["perplexity"] / rows["full"]["perplexity"])
        assert r["tokens_per_s_transformers"] > 0 and r["tokens_per_s_optimized"] > 0
        assert name in text
    saved = json.loads((out / "results.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(rows)) and saved["plan"]["steps"] == TINY.steps
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_checkpoints_load_back_with_the_reported_perplexity(demo_run):
    out, rows, _ = demo_run
    _, windows = split_corpus(1, TINY.eval_windows, TINY.length)
    for name, slug in (("M-SMoE + KD", "m-smoe-kd"), ("MC-SMoE one-shot + KD", "mc-smoe-one-shot-kd"),
                       ("MC-SMoE pruned during KD", "mc-smoe-pruned-during-kd")):
        model = from_pretrained(out / "checkpoints" / slug)
        assert perplexity(model, windows) == pytest.approx(rows[name]["perplexity"], rel=1e-4)


def test_method_comparison_starts_from_the_merge_checkpoint_with_one_kd_budget(demo_run):
    """Issues 20 and 21 in the demo: every method at each ratio, one-shot and after the same KD budget, from the
    checkpoint at steps - recover_steps (saved as checkpoints/teacher), M-SMoE's exact and standard forms side
    by side; the goals are computed from those rows."""
    from mcsmoe_fast.demo.recipe import DEMO_METHODS

    out, rows, text = demo_run
    saved = json.loads((out / "results.json").read_text())
    methods = saved["methods"]
    assert methods == json.loads((out / "methods" / "results.json").read_text())
    assert [(r["method"], r["ratio"]) for r in methods["rows"]] == [("full", 0.0)] + [
        (m, r) for r in TINY.compare_ratios for m in DEMO_METHODS]
    budget = TINY.method_kd_steps
    assert methods["kd_steps"] == budget and methods["merged_from_step"] == TINY.merge_step
    assert TINY.merge_step + budget <= TINY.steps
    by_method = {(r["method"], r["ratio"]): r for r in methods["rows"]}
    for r in methods["rows"][1:]:
        assert r["kd_steps"] == budget and r["perplexity_kd"] != r["perplexity"]
        form = "exact" if r["method"] in ("m-smoe", "hc-smoe", "m-smoe+c") else "standard"
        assert r["form"] == (form + ", compressed" if r["method"].endswith("+c") else form)
        assert r["experts"] == TINY.experts - round(r["ratio"] * TINY.experts)
        if r["method"].endswith("+c"):  # the MC-SMoE rows' settings: smaller than the same merge uncompressed
            plain = by_method[(r["method"][:-2], r["ratio"])]
            low_rank = TINY.rank * (3 * TINY.intermediate_size + 2 * TINY.hidden_size) * r["experts"] * TINY.layers
            assert low_rank < r["expert_params"] <= low_rank + TINY.keep_ratio * plain["expert_params"]
    _, held_out = split_corpus(1, TINY.eval_windows, TINY.length)
    teacher = from_pretrained(out / "checkpoints" / "teacher")
    teacher_ppl = perplexity(teacher, held_out)
    assert methods["rows"][0]["perplexity"] == pytest.approx(teacher_ppl, rel=1e-5)
    assert teacher_ppl != pytest.approx(rows["full"]["perplexity"], rel=1e-3), "the teacher is not the final model"
    by = {(r["method"], r["ratio"]): r for r in methods["rows"]}
    for goal in saved["goals"]:
        exact, standard = by[("m-smoe", goal["ratio"])], by[("m-smoe-standard", goal["ratio"])]
        assert goal["standard_gap"] == pytest.approx(standard["perplexity_kd"] / exact["perplexity_kd"] - 1)
        assert goal["reap_kd"] == by[("reap", goal["ratio"])]["perplexity_kd"]
        assert goal["best_merging_kd"] == min(by[(m, goal["ratio"])]["perplexity_kd"]
                                              for m in ("m-smoe", "m-smoe-standard", "hc-smoe", "ream", "m-smoe+c",
                                                        "ream+c"))
    assert f"after KD ({budget} steps)" in text and "goal <= +3%" in text and "vs REAP" in text
    assert (out / "methods" / "results.md").exists()


def test_out_dir_with_foreign_files_is_refused(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="mine.txt"):
        run_demo(tmp_path, plan=TINY, progress=False, print_fn=lambda s: None)
    assert (tmp_path / "mine.txt").read_text() == "keep me"


def test_corpus_split_is_disjoint_and_deterministic():
    import sysconfig
    from pathlib import Path

    root = Path(sysconfig.get_paths()["stdlib"])
    files = stdlib_files()
    held = [p for p in files if is_held_out(p, root)]
    assert 0 < len(held) < len(files) / 4
    a, b = split_corpus(5000, 3, 1000)
    assert torch.equal(a, split_corpus(5000, 3, 1000)[0]) and a.numel() == 5000 and b.shape == (3, 1000)
    assert int(a.max()) < 256
    train_text = b"".join(p.read_bytes() for p in files if not is_held_out(p, root))
    assert bytes(a.to(torch.uint8).tolist()) == train_text[:5000]


def test_held_out_windows_are_drawn_from_every_part_of_the_held_out_files():
    """The evaluation windows are spread over all held-out files (not their first bytes): they start with the
    first held-out file's first bytes, end with the last file's last whole window, and come from most files."""
    import sysconfig
    from pathlib import Path

    root = Path(sysconfig.get_paths()["stdlib"])
    held = [p for p in stdlib_files() if is_held_out(p, root)]
    stream = b"".join(p.read_bytes() for p in held)
    ends = torch.tensor([p.stat().st_size for p in held]).cumsum(0)
    length, count = 64, 2 * len(held)
    _, windows = split_corpus(1, count, length)
    assert windows.shape == (count, length) and windows.dtype == torch.long
    starts = [-1]
    for row in windows:  # the first whole window of the stream after the previous one holding these bytes
        text = bytes(row.to(torch.uint8).tolist())
        start = next((i for i in range((starts[-1] // length + 1) * length, len(stream) - length + 1, length)
                      if stream[i: i + length] == text), None)
        assert start is not None, "every window is a whole window of the held-out stream, in order"
        starts.append(start)
    starts = starts[1:]
    assert starts[0] == 0 and starts[-1] == (len(stream) // length - 1) * length
    assert len(set(starts)) == count
    files_hit = set(torch.searchsorted(ends, torch.tensor(starts), right=True).tolist())
    assert len(files_hit) >= len(held) // 2, f"windows from {len(files_hit)} of {len(held)} held-out files"


@pytest.mark.parametrize("count", [0, 10**9])
def test_held_out_window_count_out_of_range_is_refused(count):
    with pytest.raises(ValueError, match="windows"):
        split_corpus(1, count, 128)


@pytest.mark.parametrize("bad,match", [({"recover_steps": 24}, "recover_steps"), ({"groups": 8}, "groups"),
                                       ({"compare_kd_steps": 9}, "compare_kd_steps")])
def test_plan_refuses_bad_values(bad, match):
    from dataclasses import asdict

    with pytest.raises(ValueError, match=match):
        DemoPlan(**{**asdict(TINY), **bad})
