"""Evaluation results that were silently wrong, each checked against what the metric or option means:
a causal LM scored on a text-to-text task (its generate returns the prompt too), predictions that moved with
the batch size under a left-padding tokenizer (Switch's expert capacity counts the leading pads), lm-eval
scores of one metric under several filters folded into one key, and limits and batch sizes of 0 or below
taken as "no limit" / "the default"."""
import argparse
import sys
import types

import pytest
import torch

from mcsmoe_fast.calibration_data import calibration_batches as text_batches
from mcsmoe_fast.cli.compare import harness_option
from mcsmoe_fast.cli.data_options import add_data_options, resolve_data
from mcsmoe_fast.tasks import encode_pairs, evaluate_task, get_task, predict_task, training_batches
from mcsmoe_fast.tasks.harness import harness_evaluate
from mcsmoe_fast.tiny import TINY_WORDS, tiny_mixtral, tiny_switch, tiny_tokenizer
from test_tasks import task_tokenizer

WORDS = "alpha beta gamma delta eps zeta eta theta iota kappa lam mu nu xi omi pi rho sig tau ups phi chi psi".split()


def sst2_examples(n: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 31, (n,), generator=g).tolist()
    return [{"sentence": " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (k,), generator=g).tolist()),
             "label": i % 2, "idx": i} for i, k in enumerate(lengths)]


def test_text_to_text_tasks_refuse_a_causal_lm():
    squad = get_task("squad")
    examples = [{"context": "alpha beta gamma", "question": "what is beta",
                 "answers": {"text": ["beta"], "answer_start": [6]}}]
    tok = task_tokenizer(squad, examples)
    for run in (predict_task, evaluate_task):
        with pytest.raises(ValueError, match=r"squad task evaluates an encoder-decoder model .*MixtralForCausalLM"):
            run(tiny_mixtral(), tok, squad, examples, max_new_tokens=2, progress=False)


@pytest.mark.parametrize("label_scoring", [True, False])
def test_switch_predictions_do_not_move_with_the_batch_size_under_a_left_padding_tokenizer(label_scoring):
    """Capacity 4 per expert and sequence: leading pads would take it from the real tokens."""
    task, examples = get_task("sst2"), sst2_examples(24)
    tok = task_tokenizer(task, examples, add_eos=True)
    model = tiny_switch(expert_capacity=4, num_experts=4, seed=0)
    answers = {}
    for side in ("right", "left"):
        tok.padding_side = side
        for batch in (1, 8):
            answers[side, batch] = predict_task(model, tok, task, examples, batch_size=batch, max_new_tokens=3,
                                                label_scoring=label_scoring, progress=False)
    assert tok.padding_side == "left"  # the user's tokenizer is left as it was
    assert len(set(map(tuple, answers.values()))) == 1, answers


def test_training_and_calibration_batches_pad_on_the_right_whatever_the_tokenizer_says():
    task, examples = get_task("sst2"), sst2_examples(6)
    tok = task_tokenizer(task, examples, add_eos=True)
    tok.padding_side = "left"
    batch = encode_pairs(tok, [task.to_text(ex) for ex in examples])
    mask = batch["attention_mask"]
    assert bool((mask[:, 0] == 1).all()) and bool((mask[:, :-1] >= mask[:, 1:]).all())  # ones, then zeros
    assert bool((mask[:, -1] == 0).any())  # some row is padded
    lm_tok = tiny_tokenizer()
    lm_tok.padding_side = "left"
    texts = ["the quick brown fox jumps", "a lazy dog", "experts"]
    for b in text_batches(texts, lm_tok, batch_size=3):
        m = b["attention_mask"]
        assert bool((m[:, 0] == 1).all()) and bool((m[:, :-1] >= m[:, 1:]).all()) and bool((m == 0).any())


def fake_lm_eval(monkeypatch, results: dict) -> dict:
    calls = {}

    def simple_evaluate(model, tasks, num_fewshot, limit):
        calls.update(tasks=tasks, limit=limit)
        return {"results": results}

    fake = types.ModuleType("lm_eval")
    fake.simple_evaluate = simple_evaluate
    hf = types.ModuleType("lm_eval.models.huggingface")
    hf.HFLM = lambda pretrained, tokenizer, batch_size: object()
    for name, module in (("lm_eval", fake), ("lm_eval.models", types.ModuleType("lm_eval.models")),
                         ("lm_eval.models.huggingface", hf)):
        monkeypatch.setitem(sys.modules, name, module)
    return calls


def test_lm_eval_scores_under_several_filters_keep_one_key_each(monkeypatch):
    fake_lm_eval(monkeypatch, {
        "gsm8k": {"alias": "gsm8k", "exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": 0.01,
                  "exact_match,flexible-extract": 0.40, "exact_match_stderr,flexible-extract": 0.01},
        "arc_easy": {"acc,none": 0.5, "acc_stderr,none": 0.02}})
    scores = harness_evaluate(tiny_mixtral(), None, ["gsm8k", "arc_easy"])
    assert scores == {"gsm8k/exact_match,strict-match": 0.25, "gsm8k/exact_match,flexible-extract": 0.40,
                      "arc_easy/acc": 0.5}


def test_lm_eval_limits_below_one_are_refused(monkeypatch):
    calls = fake_lm_eval(monkeypatch, {"arc_easy": {"acc,none": 0.5}})
    for limit in (0, -1):
        with pytest.raises(ValueError, match=f"limit must be > 0 .*got {limit}"):
            harness_evaluate(tiny_mixtral(), None, ["arc_easy"], limit=limit)
    assert not calls
    harness_evaluate(tiny_mixtral(), None, ["arc_easy"], limit=3)
    assert calls["limit"] == 3
    args = argparse.Namespace(lm_eval=["arc_easy"], lm_eval_include=None, num_fewshot=None, lm_eval_limit=0,
                              lm_eval_batch_size=8)
    with pytest.raises(ValueError, match="--lm-eval-limit must be >= 1, got 0"):
        harness_option(args, None)


def test_eval_limit_on_the_perplexity_path(tmp_path):
    path = tmp_path / "held_out.txt"
    path.write_text((TINY_WORDS + " ") * 4)
    parser = argparse.ArgumentParser()
    add_data_options(parser, training=False)

    def windows(limit):
        args = parser.parse_args(["--eval-text", str(path), "--length", "8"] + ([] if limit is None else
                                                                                 ["--eval-limit", str(limit)]))
        data = resolve_data(args, tiny_tokenizer(), training=False)
        return next(c.cell_contents for c in data.evaluate.__closure__ if hasattr(c.cell_contents, "shape"))

    every = windows(None)
    assert every.shape[0] > 3
    assert torch.equal(windows(2), every[:2])
    for limit in (0, -1):
        with pytest.raises(ValueError, match=f"--eval-limit must be >= 1, got {limit}"):
            windows(limit)


def test_training_batches_take_the_papers_batch_size_only_when_none_is_given():
    task, examples = get_task("sst2"), sst2_examples(70)
    tok = task_tokenizer(task, examples, add_eos=True)
    assert [b["input_ids"].shape[0] for b in training_batches(task, tok, examples)] == [task.batch_size, 70 - 64]
    assert [b["input_ids"].shape[0] for b in training_batches(task, tok, examples, batch_size=32)] == [32, 32, 6]
    for bad in (0, -1):
        with pytest.raises(ValueError, match=f"batch_size must be >= 1, got {bad}"):
            training_batches(task, tok, examples, batch_size=bad)
