"""The demo and the python/ recipes keep what they promise: the demo writes only into a directory it wrote (or an
empty one), calibrates on exactly the windows its plan names and refuses a plan it cannot run; the switch-base-32
recipe refuses an --out holding a run before writing anything; the Mixtral recipe refuses counts below one before
loading anything; the demo's --help and the README describe the run the demo makes."""
import contextlib
import importlib.util
import io
import itertools
import json
import re
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

import mcsmoe_fast
import mcsmoe_fast.demo.recipe as recipe
from mcsmoe_fast.demo import prepare_out_dir, run_demo
from mcsmoe_fast.demo.corpus import split_corpus
from mcsmoe_fast.demo.recipe import DemoPlan
from mcsmoe_fast.tiny import tiny_mixtral, tiny_switch, tiny_tokenizer
from mcsmoe_fast.train.text import Windows

ROOT = Path(__file__).resolve().parent.parent
TINY = DemoPlan(hidden_size=32, intermediate_size=64, heads=2, length=32, batch_size=8, steps=24, recover_steps=8,
                learning_rate=1e-2, kd_learning_rate=5e-3, warmup_steps=4, rank=4, calibration_windows=16,
                eval_windows=8, compare_kd_steps=None)
MARK = ".mcsmoe-demo"  # the file the demo writes first into every --out it writes


def load_recipe(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "python" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Stop(Exception):
    pass


# finding 1: a user's directory with the demo's top-level names is not the demo's

def test_demo_refuses_a_users_directory_holding_results_and_checkpoints(tmp_path):
    exp = tmp_path / "my-experiment"
    (exp / "checkpoints").mkdir(parents=True)
    (exp / "results.json").write_text('{"my_accuracy": 0.93}')
    tiny_mixtral(seed=123).save_pretrained(exp / "checkpoints" / "teacher")
    before = {p: p.read_bytes() for p in exp.rglob("*") if p.is_file()}
    with pytest.raises(FileExistsError, match=f"not written by the demo.*no {MARK}.*empty or new directory"):
        run_demo(exp, plan=TINY, progress=False, print_fn=lambda s: None)
    assert {p: p.read_bytes() for p in exp.rglob("*") if p.is_file()} == before


def test_demo_accepts_an_empty_directory_and_one_it_wrote(tmp_path):
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "new", tmp_path / "empty"):
        assert prepare_out_dir(out) == out and [p.name for p in out.iterdir()] == [MARK]
        (out / "results.json").write_text("{}")
        (out / "checkpoints").mkdir()
        assert prepare_out_dir(out) == out  # a rerun into the demo's own outputs
        (out / "mine.txt").write_text("keep me")
        with pytest.raises(FileExistsError, match="mine.txt"):
            prepare_out_dir(out)


# finding 2: the switch-base-32 recipe re-run into an --out holding a run

def test_switch_recipe_rerun_into_a_run_is_refused_before_writing(tmp_path, capsys):
    switch = load_recipe("switch_base_32_mcsmoe")
    nouns, good, bad = ("experts", "router", "model", "layer"), ("great", "fast", "good"), ("bad", "slow", "poor")
    prompt = "Question: Was that sentence positive or negative? Answer:"
    rows = "\n".join(json.dumps({"sentence": f"the {n} is {a}", "label": int(a in good), "idx": i})
                     for i, (n, a) in enumerate(itertools.product(nouns, good + bad)))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text(rows)
    (tmp_path / "data" / "validation.jsonl").write_text(rows)
    tiny_switch().save_pretrained(tmp_path / "model")
    tiny_tokenizer(" ".join((*nouns, *good, *bad, "the is positive negative", prompt))).save_pretrained(
        tmp_path / "model")

    def run(groups):
        with contextlib.redirect_stdout(io.StringIO()):
            return switch.main(["--model", tmp_path / "model", "--task", "sst2", "--data-dir", tmp_path / "data",
                                "--out", tmp_path / "run", "--finetune-steps", 0, "--merge-steps", 2,
                                "--compress-steps", 2, "--batch-size", 4, "--eval-every", 2, "--num-groups", groups,
                                "--rank", 4, "--quiet"])

    assert run(2) == 0
    before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    capsys.readouterr()
    assert run(3) == 2
    assert re.search(r"error: --out \S*msmoe holds a training run \(\w+/ at step 2\): --resume continues it",
                     capsys.readouterr().err)
    assert {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()} == before


# finding 3: the Mixtral recipe's counts below one

@pytest.mark.parametrize("option,value,least", [
    ("--eval-windows", -1, 1), ("--eval-windows", 0, 1), ("--length", 1, 2), ("--eval-batch-size", 0, 1),
    ("--calib-batch-size", 0, 1), ("--num-samples", 0, 1), ("--max-length", 0, 1), ("--lm-eval-limit", 0, 1),
    ("--lm-eval-batch-size", 0, 1), ("--lm-eval-fewshot", -1, 0)])
def test_mixtral_recipe_refuses_counts_below_their_least_before_loading(tmp_path, monkeypatch, capsys, option, value,
                                                                        least):
    def loaded(*args, **kwargs):
        raise AssertionError("the tokenizer or the model was loaded before the options were checked")

    monkeypatch.setattr(mcsmoe_fast, "load_tokenizer", loaded)
    monkeypatch.setattr(mcsmoe_fast, "open_model", loaded)
    rc = load_recipe("mixtral_one_shot").main(
        ["--model", tmp_path / "model", "--calib", tmp_path / "calib.txt", "--eval-text", tmp_path / "heldout.txt",
         "--out", tmp_path / "run", option, value])
    assert (rc, capsys.readouterr().err) == (2, f"error: {option} must be >= {least}, got {value}\n")
    assert not (tmp_path / "run").exists()


# findings 4 and 5: --help and the README describe the demo as it runs

def demo_help() -> str:
    from mcsmoe_fast.cli import build_parser

    return " ".join(build_parser()[1]["demo"].format_help().split())


def readme() -> str:
    return " ".join((ROOT / "README.md").read_text().split())


def test_demo_help_gives_the_readmes_time():
    low, high = re.search(r"takes about (\d+)-(\d+) minutes on two CPU cores", readme()).groups()
    assert f"about {low}-{high} minutes on two CPU cores" in demo_help()


def test_demo_help_and_readme_say_msmoe_counts_are_per_layer_averages(monkeypatch):
    """The demo's M-SMoE rows spread plan.groups per layer on average over the layers (adaptive counts): with the
    tiny plan the layers get other counts than 4, so "8 -> 4 per layer" must say "on average"."""
    real, merges = recipe.merge_experts, []

    def spy(*args, **kwargs):
        merges.append(real(*args, **kwargs))
        if len(merges) == 2:  # the random baseline, then M-SMoE
            raise Stop
        return merges[-1]

    monkeypatch.setattr(recipe, "merge_experts", spy)
    with pytest.raises(Stop):
        recipe.run_recipe(TINY, progress=False, print_fn=lambda s: None)
    counts = [g.num_groups for g in merges[1].values()]
    assert [g.num_groups for g in merges[0].values()] == [4, 4]  # the random baseline: 4 in every layer
    assert sum(counts) == 4 * TINY.layers and set(counts) != {4}
    assert "M-SMoE 8 -> 4 on average" in demo_help()
    assert re.search(r"merge 8 -> 4 experts per layer on average \(M-SMoE, with adaptive per-layer counts", readme())


# finding 6: calibration_windows honoured exactly

@pytest.mark.parametrize("windows", [20, 8])
def test_demo_calibrates_on_exactly_the_plans_windows(monkeypatch, windows):
    plan = DemoPlan(**{**asdict(TINY), "steps": 8, "recover_steps": 4, "warmup_steps": 1,
                       "calibration_windows": windows})
    seen = []

    def spy(model, batches, **kwargs):
        seen.extend(b["input_ids"] for b in batches)
        raise Stop

    monkeypatch.setattr(recipe, "collect_routing_stats", spy)
    with pytest.raises(Stop):
        recipe.run_recipe(plan, progress=False, print_fn=lambda s: None)
    train_tokens, _ = split_corpus(int(plan.steps * plan.batch_size * plan.length * 1.05), plan.eval_windows,
                                   plan.length)
    assert torch.equal(torch.cat(seen), Windows(train_tokens, plan.length).rows[:windows])


# finding 7: recover_steps too small for MC-SMoE's two KD halves

def test_plan_refuses_one_recovery_step():
    with pytest.raises(ValueError, match=r"recover_steps must be in \[2, steps\).*MC-SMoE.*got 1 of 24"):
        DemoPlan(**{**asdict(TINY), "recover_steps": 1})


def test_demo_reruns_into_its_own_out_after_a_kill_while_writing_results(tmp_path):
    """A kill inside results.json's rewrite leaves write_text_atomic's temporary: it is the demo's, removed."""

    out = prepare_out_dir(tmp_path / "demo")
    (out / "results.json").write_text("{}")
    (out / ".results.json.tmp-1a2b3c4d").write_text('{"rows"')
    prepare_out_dir(out)
    assert sorted(p.name for p in out.iterdir()) == [".mcsmoe-demo", "results.json"]
    (out / ".results.json.tmp-notes").write_text("a user's")  # not the temporary's name: refused as before
    with pytest.raises(FileExistsError, match="did not write"):
        prepare_out_dir(out)
