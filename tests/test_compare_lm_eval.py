"""`compare --lm-eval` (compare.py with tasks/harness.py): every model of the comparison, one-shot and after KD,
scored by lm-evaluation-harness on a task of the user's own (a YAML file over local data, lm-eval's include_path;
no network). The harness' numbers are checked against a plain-PyTorch transcription of its loglikelihood task:
perplexity = exp(-mean over documents of log P(continuation | context)), the continuation's tokens being those
of tokenize(context + continuation) past tokenize(context)."""
import copy
import json
import math

import lm_eval  # noqa: F401  (a test extra: these tests run wherever the suite does)
import pytest
import torch

from mcsmoe_fast import collect_routing_stats
from mcsmoe_fast.cli import main
from mcsmoe_fast.compare import compare_methods
from mcsmoe_fast.merge import merge_experts
from mcsmoe_fast.prune import prune_experts
from mcsmoe_fast.tasks.harness import check_tasks, harness_evaluate
from mcsmoe_fast.tiny import tiny_mixtral
from test_cli_merge import LINES, tiny_tokenizer
from test_compare import kd_setup, saved_model_and_texts


def write_task(directory, name="tiny_ll"):
    """A loglikelihood task over 7 local documents (context: 4 words, continuation: the next 2)."""
    directory.mkdir(parents=True, exist_ok=True)
    words = " ".join(LINES).split()
    docs = [{"context": " ".join(words[i:i + 4]), "continuation": " " + " ".join(words[i + 4:i + 6])}
            for i in range(0, 28, 4)]
    (directory / "docs.jsonl").write_text("\n".join(json.dumps(d) for d in docs) + "\n")
    (directory / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {directory / 'docs.jsonl'}\n"
        "test_split: test\noutput_type: loglikelihood\ndoc_to_text: \"{{context}}\"\n"
        "doc_to_target: \"{{continuation}}\"\ntarget_delimiter: \"\"\n"
        "metric_list:\n  - metric: perplexity\n  - metric: acc\n")
    return docs


@torch.no_grad()
def task_perplexity(model, tokenizer, docs) -> float:
    lls = []
    for d in docs:
        context = tokenizer(d["context"], add_special_tokens=False)["input_ids"]
        whole = tokenizer(d["context"] + d["continuation"], add_special_tokens=False)["input_ids"]
        logp = torch.log_softmax(model(torch.tensor([whole])).logits.double(), -1)[0]
        lls.append(sum(logp[len(context) - 1 + i, t].item() for i, t in enumerate(whole[len(context):])))
    return math.exp(-sum(lls) / len(lls))


def test_harness_scores_a_local_task_as_its_definition_says(tmp_path):
    docs = write_task(tmp_path / "tasks")
    model, tokenizer = tiny_mixtral().eval(), tiny_tokenizer()
    scores = harness_evaluate(model, tokenizer, ["tiny_ll"], include_path=tmp_path / "tasks")
    assert scores["tiny_ll/perplexity"] == pytest.approx(task_perplexity(model, tokenizer, docs), rel=1e-6)
    assert check_tasks(["tiny_ll"], tmp_path / "tasks") == ["tiny_ll"]
    with pytest.raises(ValueError, match=r"does not know the task\(s\) \['tiny_lx'\] \(nor in .*tasks\)"):
        check_tasks(["tiny_ll", "tiny_lx"], tmp_path / "tasks")


def test_every_row_is_scored_on_its_own_model_one_shot_and_after_kd(tmp_path):
    docs = write_task(tmp_path / "tasks")
    model, tokenizer = tiny_mixtral(), tiny_tokenizer()
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(3, 128, (3, 12), generator=g)} for _ in range(2)]
    windows = torch.randint(3, 128, (4, 16), generator=g)
    kd, kd_data = kd_setup()
    harness = lambda m: harness_evaluate(m, tokenizer, ["tiny_ll"], include_path=tmp_path / "tasks")  # noqa: E731
    result = compare_methods(model, batches, windows, ["reap", "m-smoe"], [0.5], progress=False, kd=kd,
                             kd_data=kd_data, harness=harness)
    stats = collect_routing_stats(model, batches, bases=("router-logits", "feature", "expert-output"),
                                  saliency="reap", progress=False)
    merged = copy.deepcopy(model)
    merge_experts(merged, stats, 4, globally=False, similarity="router-logits", progress=False)
    expected = {"full": model, "reap": prune_experts(model, stats, ratio=0.5, method="reap"), "m-smoe": merged}
    for row in result["rows"]:
        want = task_perplexity(expected[row["method"]].eval(), tokenizer, docs)
        assert row["lm_eval"]["tiny_ll/perplexity"] == pytest.approx(want, rel=1e-5), row["method"]
    one_shot = {r["lm_eval"]["tiny_ll/perplexity"] for r in result["rows"]}
    assert len(one_shot) == 3, "the rows were not scored on their own models"
    for row in result["rows"][1:]:  # after KD: a trained model, scored again
        assert row["lm_eval_kd"]["tiny_ll/perplexity"] != pytest.approx(row["lm_eval"]["tiny_ll/perplexity"], rel=1e-4)
    assert "lm_eval_kd" not in result["rows"][0]


def test_compare_command_with_lm_eval(tmp_path, capsys):
    saved_model_and_texts(tmp_path)
    write_task(tmp_path / "tasks")
    args = ["compare", "--model", tmp_path / "mixtral", "--calib", tmp_path / "calib.txt", "--eval-text",
            tmp_path / "eval.txt", "--eval-length", 16, "--methods", "reap", "--ratios", "0.5",
            "--lm-eval", "tiny_ll", "--lm-eval-include", tmp_path / "tasks", "--lm-eval-limit", 3,
            "--out", tmp_path / "out"]
    assert main([str(a) for a in args]) == 0
    assert "| tiny_ll/perplexity |" in capsys.readouterr().out
    rows = json.loads((tmp_path / "out" / "results.json").read_text())["rows"]
    assert [r["lm_eval"]["tiny_ll/sample_len"] for r in rows] == [3.0, 3.0]  # --lm-eval-limit reached the harness
    typo = [a if a != "tiny_ll" else "tiny_lx" for a in args]
    assert main([str(a) for a in typo]) == 2
    assert "does not know the task(s) ['tiny_lx']" in capsys.readouterr().err
    orphan = args[:args.index("--lm-eval")] + ["--num-fewshot", 1, "--out", tmp_path / "o2"]
    assert main([str(a) for a in orphan]) == 2
    assert "--num-fewshot need --lm-eval TASKS" in capsys.readouterr().err
