"""`compare` larger than memory (compare_streamed.py, `mcsmoe-fast compare --max-memory`): every method run layer by
layer and evaluated layer by layer gives the rows the in-memory comparison gives (the same experts, expert
parameters, form and perplexity); what it cannot run larger than memory is refused up front."""
from __future__ import annotations

import json

import pytest

from mcsmoe_fast.cli import main
from mcsmoe_fast.compare import compare_methods
from mcsmoe_fast.compress import CompressOptions
from mcsmoe_fast.loading import open_model
from mcsmoe_fast.compare_streamed import STREAMED_METHODS, compare_checkpoint
from mcsmoe_fast.tiny import tiny_mixtral
from merge_helpers import calibration
from test_cli_merge import LINES, tiny_tokenizer


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare-streamed")
    tiny_mixtral(seed=3).save_pretrained(root / "model", max_shard_size="60KB")
    tiny_tokenizer().save_pretrained(root / "model")
    (root / "calib.txt").write_text("\n".join(LINES * 3) + "\n")
    return root


def _same_rows(got, want):
    assert [(r["method"], r["ratio"], r["experts"], r["expert_params"], r["form"]) for r in got] == \
        [(r["method"], r["ratio"], r["experts"], r["expert_params"], r["form"]) for r in want]
    for g, w in zip(got, want):
        assert g["perplexity"] == pytest.approx(w["perplexity"], rel=1e-5), g["method"]
        assert g["expert_share"] == pytest.approx(w["expert_share"])


def test_streamed_compare_gives_the_in_memory_rows(source, tmp_path):
    model = open_model(str(source / "model"))
    batches = calibration(model, seed=5, batches=2, batch=2, length=7)
    windows = calibration(model, seed=6, batches=1, batch=6, length=10)[0]["input_ids"]
    compress = CompressOptions(rank=4, keep_ratio=0.3)
    want = compare_methods(model, batches, windows, STREAMED_METHODS, (0.25, 0.5), progress=False, compress=compress)
    scratch = tmp_path / "scratch"
    got = compare_checkpoint(source / "model", batches, windows, STREAMED_METHODS, (0.25, 0.5), scratch=scratch,
                             max_memory="1KB", progress=False, compress=compress)
    assert got["streamed"] is True and got["experts"] == want["experts"]
    _same_rows(got["rows"], want["rows"])
    assert list(scratch.iterdir()) == []  # every reduced checkpoint and activation file removed
    assert len({round(r["perplexity"], 6) for r in got["rows"]}) == len(got["rows"])  # the methods differ


def test_cli_compare_larger_than_memory(source, tmp_path, capsys):
    args = ["compare", "--model", source / "model", "--calib", source / "calib.txt", "--eval-text",
            source / "calib.txt", "--eval-length", 16, "--methods", "reap,m-smoe,m-smoe+c", "--ratios", 0.5,
            "--compress-rank", 4,
            "--out", tmp_path / "out"]
    assert main([str(a) for a in args + ["--max-memory", "1KB"]]) == 0
    out = capsys.readouterr().out
    assert "layer by layer" in out and "| reap | 50% |" in out
    streamed = json.loads((tmp_path / "out" / "results.json").read_text())
    assert main([str(a) for a in args]) == 0  # the same command in memory
    capsys.readouterr()
    in_memory = json.loads((tmp_path / "out" / "results.json").read_text())
    assert streamed["streamed"] is True and "streamed" not in in_memory
    _same_rows(streamed["rows"], in_memory["rows"])
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if not p.name.startswith("perplexity")) == \
        ["results.json", "results.md"]


@pytest.mark.parametrize("extra,message", [
    (["--methods", "ream+c,reap"], "ream+c cannot be compared"),
    (["--methods", "m-smoe+c", "--compress-importance", "activation"], "use weight importance"),
    (["--methods", "reap", "--kd-steps", "2"], "--kd-steps needs the model in memory"),
    (["--methods", "reap", "--lm-eval", "lambada"], "--lm-eval needs the model in memory"),
])
def test_what_compare_cannot_do_larger_than_memory_is_refused(source, tmp_path, capsys, extra, message):
    args = ["compare", "--model", source / "model", "--calib", source / "calib.txt", "--eval-text",
            source / "calib.txt", "--ratios", 0.5, "--out", tmp_path / "out", "--max-memory", "1KB", *extra]
    assert main([str(a) for a in args]) != 0
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_offload_dir_is_where_the_scratch_goes(source, tmp_path, capsys, monkeypatch):
    """--offload-dir: the reduced checkpoints and activations are written (and removed) there, not inside --out."""
    import mcsmoe_fast.compare_streamed as streamed

    parents = []
    real = streamed.scratch_directory

    def recording(parent, prefix):
        parents.append(str(parent))
        return real(parent, prefix)

    monkeypatch.setattr(streamed, "scratch_directory", recording)
    base = ["compare", "--model", source / "model", "--calib", source / "calib.txt", "--eval-text", source / "calib.txt",
            "--eval-length", 16, "--methods", "reap", "--ratios", 0.5, "--max-memory", "1KB"]
    assert main([str(a) for a in base + ["--out", tmp_path / "a", "--offload-dir", tmp_path / "scratch"]]) == 0
    assert main([str(a) for a in base + ["--out", tmp_path / "b"]]) == 0
    capsys.readouterr()
    assert parents == [str(tmp_path / "scratch"), str(tmp_path / "b")]
    assert list((tmp_path / "scratch").iterdir()) == []


def test_cli_compare_larger_than_memory_keeps_the_finished_rows_when_a_later_one_fails(source, tmp_path, monkeypatch):
    import mcsmoe_fast.compare_streamed as streamed
    from test_methods_edge_cases import failing_on_the_third_call

    monkeypatch.setattr(streamed, "streamed_perplexity", failing_on_the_third_call())
    args = ["compare", "--model", source / "model", "--calib", source / "calib.txt", "--eval-text",
            source / "calib.txt", "--eval-length", 16, "--methods", "reap,frequency", "--ratios", 0.5,
            "--out", tmp_path / "out", "--max-memory", "1KB"]
    with pytest.raises(RuntimeError, match="third row"):
        main([str(a) for a in args])
    rows = json.loads((tmp_path / "out" / "results.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["full", "reap"] and rows[1]["perplexity"] == 7.0
