"""Options accepted and then ignored, or accepted on one path only (session 36's options audit; each test failed
before its fix): merge --num-groups at or above the expert count is refused when streamed as in memory; compress's
calibration options without --calib; compare's --lm-eval-batch-size without --lm-eval; optimize's dropless."""
import argparse

import pytest

import mcsmoe_fast as mf
from mcsmoe_fast.cli import main
from mcsmoe_fast.cli.compare import harness_option
from mcsmoe_fast.tiny import tiny_mixtral
from test_cli_merge import LINES, tiny_tokenizer


@pytest.fixture(scope="module")
def space(tmp_path_factory):
    root = tmp_path_factory.mktemp("options2")
    tiny_mixtral().save_pretrained(root / "mixtral")
    tiny_tokenizer().save_pretrained(root / "mixtral")
    (root / "calib.txt").write_text("\n".join(LINES * 2) + "\n")
    return root


def run(args, capsys):
    rc = main([str(a) for a in args])
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("streamed", [False, True], ids=["in_memory", "streamed"])
def test_merge_refuses_num_groups_not_below_the_experts_on_both_paths(space, capsys, streamed):
    budget = ["--max-memory", "1KB"] if streamed else []
    rc, err = run(["merge", "--model", space / "mixtral", "--calib", space / "calib.txt", "--num-groups", 8,
                   "--out", space / "nothing", *budget], capsys)
    assert rc == 2 and "nothing would be merged: --num-groups 8" in err and "(8)" in err
    assert not (space / "nothing").exists()


@pytest.mark.parametrize("option", [("--num-samples", 3), ("--batch-size", 2), ("--max-length", 3),
                                    ("--text-field", "body"), ("--split", "test")])
def test_compress_refuses_calibration_options_without_calib(space, capsys, option):
    rc, err = run(["compress", "--model", space / "mixtral", "--out", space / "c", "--rank", 4, *option], capsys)
    assert rc == 2 and f"{option[0]} shape(s) the calibration text of --calib" in err
    assert not (space / "c").exists()


def test_compress_with_calib_reads_its_options_and_their_defaults(space, capsys, monkeypatch):
    import mcsmoe_fast.calibration_data as data

    seen = []
    real_read, real_batches = data.read_calibration_texts, data.calibration_batches
    monkeypatch.setattr(data, "read_calibration_texts", lambda path, n, *a: seen.append(n) or real_read(path, n, *a))
    monkeypatch.setattr(data, "calibration_batches",
                        lambda texts, tok, b, m: seen.append((b, m)) or real_batches(texts, tok, b, m))
    base = ["compress", "--model", space / "mixtral", "--rank", 4, "--importance", "activation",
            "--calib", space / "calib.txt"]
    assert run([*base, "--out", space / "c1"], capsys)[0] == 0
    assert run([*base, "--out", space / "c2", "--num-samples", 3, "--max-length", 5], capsys)[0] == 0
    assert seen == [256, (8, 256), 3, (8, 5)]


def lm_args(**kw):
    return argparse.Namespace(**{"lm_eval": None, "lm_eval_include": None, "num_fewshot": None, "lm_eval_limit": None,
                                 "lm_eval_batch_size": None, **kw})


def test_compare_lm_eval_batch_size_needs_lm_eval_and_defaults_to_8(monkeypatch):
    with pytest.raises(ValueError, match="--lm-eval-batch-size need --lm-eval"):
        harness_option(lm_args(lm_eval_batch_size=4), None)
    with pytest.raises(ValueError, match="--lm-eval-batch-size must be >= 1, got 0"):
        harness_option(lm_args(lm_eval=["arc_easy"], lm_eval_batch_size=0), None)
    import mcsmoe_fast.tasks.harness as harness

    monkeypatch.setattr(harness, "check_tasks", lambda tasks, include: tasks)
    assert harness_option(lm_args(lm_eval=["arc_easy"]), None).keywords["batch_size"] == 8
    assert harness_option(lm_args(lm_eval=["arc_easy"], lm_eval_batch_size=4), None).keywords["batch_size"] == 4


@pytest.mark.parametrize("value", ["no", 0, 1])
def test_optimize_refuses_a_dropless_that_is_not_a_bool(value):
    with pytest.raises(ValueError, match="dropless must be True, False or None"):
        mf.optimize(tiny_mixtral(), dropless=value)


def merged_mixtral():
    from merge_helpers import calibration

    model = tiny_mixtral()
    batches = calibration(model)
    stats = mf.collect_routing_stats(model, batches, progress=False)
    mf.merge_experts(model, stats, 4, globally=False, progress=False)
    return model, batches


@pytest.mark.parametrize("max_tokens", [0, -5, 2.5, True])
def test_to_standard_refuses_max_tokens_below_one_naming_it(max_tokens):
    from mcsmoe_fast.checkpoint.standard import to_standard

    model, batches = merged_mixtral()
    with pytest.raises(ValueError, match=f"max_tokens must be an int >= 1.*got {max_tokens!r}"):
        to_standard(model, "fitted", batches, max_tokens=max_tokens)
    to_standard(model, "fitted", batches, max_tokens=3)


def test_to_standard_refuses_an_expert_capacity_outside_switch():
    from mcsmoe_fast.checkpoint.standard import to_standard

    model, _ = merged_mixtral()
    with pytest.raises(ValueError, match="expert_capacity is Switch's setting; a mixtral model has none|no expert"):
        to_standard(model, "dominant", expert_capacity=4)


def test_dtype_help_says_saved_only_where_the_command_saves():
    """compare evaluates and writes no checkpoint: its --dtype help must not promise a saved dtype."""
    from mcsmoe_fast.cli import build_parser

    subparsers = next(a for a in build_parser()[0]._actions if a.choices and "compare" in a.choices).choices
    helps = {name: next(a.help for a in subparsers[name]._actions if "--dtype" in a.option_strings)
             for name in ("compare", "merge", "prune", "permute")}
    assert "saved" not in helps["compare"] and "output size" not in helps["compare"]
    assert all("loaded, worked on and saved in" in helps[name] for name in ("merge", "prune", "permute"))
