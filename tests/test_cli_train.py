"""`mcsmoe-fast finetune | eval | bench` end to end on tiny local models and files: a task (SST-2 from a
local jsonl) and plain text for a causal LM; KD recovery with --teacher; --resume; clear errors."""
import json
import re

import pytest
import torch

from mcsmoe_fast import from_pretrained, moe_layers
from mcsmoe_fast.tiny import tiny_mixtral, tiny_switch, tiny_tokenizer
from test_cli_merge import LINES, run

SENTENCES = [("experts are great and fast", 1), ("the router is slow and bad", 0), ("merged experts are great", 1),
             ("a bad slow model", 0), ("fast great routers", 1), ("slow bad experts", 0)]


@pytest.fixture
def space(tmp_path):
    words = [s for s, _ in SENTENCES] + LINES + ["Question: Was that sentence positive or negative? Answer:"]
    tok = tiny_tokenizer(" ".join(words))
    torch.manual_seed(0)
    tiny_switch().save_pretrained(tmp_path / "switch")
    tiny_mixtral().save_pretrained(tmp_path / "mixtral")
    for name in ("switch", "mixtral"):
        tok.save_pretrained(tmp_path / name)
    (tmp_path / "sst2.jsonl").write_text("\n".join(json.dumps({"sentence": s, "label": y}) for s, y in SENTENCES))
    (tmp_path / "train.txt").write_text(" ".join(LINES * 30))
    (tmp_path / "heldout.txt").write_text(" ".join(reversed(LINES * 6)))
    return tmp_path


def metric(out: str, name: str) -> float:
    return float(re.search(rf"^{name}: (\S+)$", out, re.M).group(1))


def test_finetune_a_task_and_eval_agrees_with_the_best_checkpoint(space, capsys):
    base = ["--task", "sst2", "--eval-data", space / "sst2.jsonl"]
    rc, out, err = run(["eval", "--model", space / "switch", *base], capsys)
    assert rc == 0, err
    before = metric(out, "accuracy")
    rc, out, err = run(["finetune", "--model", space / "switch", *base, "--data", space / "sst2.jsonl",
                        "--batch-size", 6, "--steps", 40, "--lr", 3e-3, "--warmup-steps", 2, "--eval-every", 10,
                        "--out", space / "run"], capsys)
    assert rc == 0, err
    best = float(re.search(r"best (\S+) at step", out).group(1))
    assert best == 1.0 > before, (before, out)  # six training sentences, memorised (seeds 0-3 all do by step 40)
    rc, out, err = run(["eval", "--model", space / "run" / "best", *base, "--json", space / "r.json"], capsys)
    assert rc == 0, err
    assert metric(out, "accuracy") == best == json.loads((space / "r.json").read_text())["accuracy"]


def test_finetune_text_lowers_held_out_perplexity_and_resumes(space, capsys):
    text = ["--text", space / "train.txt", "--eval-text", space / "heldout.txt", "--length", 16]
    rc, out, err = run(["eval", "--model", space / "mixtral", "--eval-text", space / "heldout.txt", "--length", 16], capsys)
    assert rc == 0, err
    before = metric(out, "perplexity")
    common = ["finetune", "--model", space / "mixtral", *text, "--batch-size", 4, "--lr", 1e-2, "--warmup-steps", 2,
              "--eval-every", 5, "--out", space / "lm"]
    rc, out, err = run([*common, "--steps", 10], capsys)
    assert rc == 0, err
    rc, out, err = run([*common, "--steps", 20, "--resume"], capsys)
    assert rc == 0, err
    assert "trained to step 20" in out
    state = json.loads((space / "lm" / "latest" / "trainer_state.json").read_text())
    assert [h["step"] for h in state["history"]] == [5, 10, 15, 20]
    rc, out, err = run(["eval", "--model", space / "lm" / "best", "--eval-text", space / "heldout.txt", "--length", 16],
                       capsys)
    assert rc == 0, err
    assert metric(out, "perplexity") < 0.5 * before


def test_kd_recovery_of_a_merged_model_keeps_its_routers(space, capsys):
    (space / "calib.txt").write_text("\n".join(LINES * 4))
    rc, _, err = run(["merge", "--model", space / "mixtral", "--calib", space / "calib.txt", "--num-groups", 2,
                      "--out", space / "merged"], capsys)
    assert rc == 0, err
    rc, out, err = run(["finetune", "--model", space / "merged", "--teacher", space / "mixtral", "--text",
                        space / "train.txt", "--length", 16, "--batch-size", 4, "--steps", 6, "--eval-every", 3,
                        "--lr", 1e-2, "--out", space / "kd"], capsys)
    assert rc == 0, err
    merged, recovered = from_pretrained(space / "merged"), from_pretrained(space / "kd" / "best")
    for a, b in zip(moe_layers(merged), moe_layers(recovered)):
        assert torch.equal(a.router_weight(), b.router_weight())
        assert a.module.experts.num_slots == b.module.experts.num_slots < 8
        assert not torch.equal(a.module.experts.w_in, b.module.experts.w_in)


def test_finetune_rank_runs_the_papers_recipe_prune_during_kd(space, capsys):
    """--rank decomposes the merged experts, the rows are pruned during KD on the schedule, and best/
    holds about keep_ratio of the sparse residual's entries (finalized: the compact form)."""
    from mcsmoe_fast.modules.compressed import CompressedMoEExperts

    (space / "calib.txt").write_text("\n".join(LINES * 4))
    rc, _, err = run(["merge", "--model", space / "mixtral", "--calib", space / "calib.txt", "--num-groups", 2,
                      "--out", space / "merged"], capsys)
    assert rc == 0, err
    rc, out, err = run(["finetune", "--model", space / "merged", "--teacher", space / "mixtral", "--text",
                        space / "train.txt", "--length", 16, "--batch-size", 4, "--steps", 12, "--eval-every", 4,
                        "--warmup-steps", 1, "--lr", 1e-2, "--rank", 4, "--keep-ratio", 0.25, "--out", space / "mc"],
                       capsys)
    assert rc == 0, err
    best = from_pretrained(space / "mc" / "best")
    modules = [m for m in best.modules() if isinstance(m, CompressedMoEExperts)]
    assert modules and not any(m.pruning for m in modules)
    kept = sum(m.in_S_rows.numel() + m.out_S_rows.numel() for m in modules)
    residual = sum(m.num_slots * (m.in_U.shape[1] * m.in_V.shape[2] + m.out_U.shape[1] * m.out_V.shape[2])
                   for m in modules)
    assert 0.2 * residual <= kept <= 0.25 * residual, (kept, residual)
    assert all(m.in_U.shape[2] == 4 for m in modules)
    state = json.loads((space / "mc" / "latest" / "trainer_state.json").read_text())
    assert state["pruner"]["steps"] == 12


def test_finetune_refuses_pruning_options_without_rank(space, capsys):
    rc, _, err = run(["finetune", "--model", space / "mixtral", "--text", space / "train.txt", "--keep-ratio", 0.2,
                      "--out", space / "o"], capsys)
    assert rc == 2 and "--keep-ratio only apply when rows are pruned during training: pass --rank" in err, err


def test_bench_prints_one_row_per_size(space, capsys):
    rc, out, err = run(["bench", "--model", space / "mixtral", "--tokens", 32, 64, "--length", 16, "--repeats", 1],
                       capsys)
    assert rc == 0, err
    rows = re.findall(r"^\s+(\d+)\s+(\d+)\s+(\d+)\s+([\d.]+)x$", out, re.M)
    assert [int(r[0]) for r in rows] == [32, 64] and all(float(r[1]) > 0 and float(r[2]) > 0 for r in rows)


@pytest.mark.parametrize("args,match", [
    (["eval", "--task", "sst2", "--eval-text", "x.txt"], "either --task"),
    (["eval"], "either --task"),
    (["eval", "--task", "nope"], "unknown task 'nope'"),
    (["eval", "--task", "sst2", "--eval-data", "missing.jsonl"], "missing.jsonl"),
    (["eval", "--eval-text", "missing.txt"], "no such text file"),
    (["finetune", "--eval-text", "{space}/heldout.txt", "--out", "{space}/o"], "--text"),
    (["finetune", "--text", "{space}/train.txt", "--out", "{space}/mixtral"], "would write into the input model"),
])
def test_bad_arguments_are_one_clear_line(space, capsys, args, match):
    args = [a.format(space=space) for a in args]
    rc, _, err = run([args[0], "--model", space / "mixtral", *args[1:]], capsys)
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert match in err, err


def test_lm_eval_is_optional_and_wired_through(space, capsys, monkeypatch):
    import sys
    import types

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # not installed
    rc, _, err = run(["eval", "--model", space / "mixtral", "--lm-eval", "hellaswag"], capsys)
    assert rc == 2 and "pip install lm-eval" in err
    calls = {}

    class FakeHFLM:
        def __init__(self, pretrained, tokenizer, batch_size):
            calls["model"], calls["tokenizer"] = pretrained, tokenizer

    def simple_evaluate(model, tasks, num_fewshot, limit):
        calls.update(tasks=tasks, num_fewshot=num_fewshot, limit=limit)
        return {"results": {"arc_easy": {"acc,none": 0.25, "acc_stderr,none": 0.01, "alias": "arc_easy"}}}

    fake = types.ModuleType("lm_eval")
    fake.simple_evaluate = simple_evaluate
    models = types.ModuleType("lm_eval.models")
    hf = types.ModuleType("lm_eval.models.huggingface")
    hf.HFLM = FakeHFLM
    registry = types.ModuleType("lm_eval.tasks")  # the task names eval checks before loading the model
    registry.TaskManager = lambda include_path=None: types.SimpleNamespace(all_tasks=["arc_easy"])
    for name, module in (("lm_eval", fake), ("lm_eval.models", models), ("lm_eval.models.huggingface", hf),
                         ("lm_eval.tasks", registry)):
        monkeypatch.setitem(sys.modules, name, module)
    rc, out, err = run(["eval", "--model", space / "mixtral", "--lm-eval", "arc_easy", "--num-fewshot", 3,
                        "--eval-limit", 5], capsys)
    assert rc == 0, err
    assert out.strip() == "arc_easy/acc: 0.2500"
    assert calls["tasks"] == ["arc_easy"] and calls["num_fewshot"] == 3 and calls["limit"] == 5
    assert moe_layers(calls["model"]) and calls["tokenizer"] is not None
