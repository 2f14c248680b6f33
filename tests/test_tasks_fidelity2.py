"""Task data and evaluation that failed late or went silently wrong (the second tasks audit): finetune / eval
--task and the switch-base-32 recipe checking their evaluation (and the recipe its training) examples only when
a run reached them, the recipe taking --lr 0 / --batch-size 0 as "the task's default", harness_evaluate leaving
the caller's model in eval mode and a pad token on its tokenizer, predict_task on no examples, calibration_batches
ignoring path= / split= beside examples=, and CSV int cells read by Python's int()."""
import copy

import pytest
import torch

import mcsmoe_fast.train
from mcsmoe_fast.cli.data_options import resolve_data
from mcsmoe_fast.tasks import calibration_batches, get_task, load_task_data, predict_task
from mcsmoe_fast.tiny import tiny_switch, tiny_tokenizer
from test_recipes import load_recipe
from test_tasks import COPA_EVAL, SQUAD_EVAL, SST2_EVAL, task_tokenizer, write_jsonl
from test_tasks_fidelity import parse


# --- 1. finetune / eval --task: the evaluation examples checked before training (and before the model loads) --------
def test_task_data_checks_the_evaluation_examples_up_front(tmp_path):
    sst2, copa = get_task("sst2"), get_task("copa")
    train = write_jsonl(tmp_path / "train.jsonl", SST2_EVAL)
    unknown = {**COPA_EVAL[1], "choice1": "Zebras.", "choice2": "Yaks."}  # both one [UNK]
    cases = [
        ("sst2", [{**ex, "label": -1} for ex in SST2_EVAL],
         r"eval.jsonl: evaluation example 0: sst2: the example has no label/answer"),
        ("sst2", [{**ex, "label": 2 if i == 3 else ex["label"]} for i, ex in enumerate(SST2_EVAL)],
         r"eval.jsonl: evaluation example 3: label 2 out of range"),
        ("copa", [COPA_EVAL[0], {**COPA_EVAL[1], "question": "Cause"}],
         r"eval.jsonl: evaluation example 1: question 'Cause': expected \"cause\" or \"effect\""),
        ("copa", [COPA_EVAL[0], unknown],
         r"eval.jsonl: copa example 1: the choices 'Zebras.', 'Yaks.' have the same token ids"),
        ("sst2", [], r"eval.jsonl: no sst2 examples to evaluate on"),
    ]
    tokenizers = {"sst2": task_tokenizer(sst2, SST2_EVAL), "copa": task_tokenizer(copa, COPA_EVAL)}
    for name, rows, match in cases:
        evaluation = write_jsonl(tmp_path / "eval.jsonl", rows)
        training_files = write_jsonl(tmp_path / "t.jsonl", COPA_EVAL) if name == "copa" else train
        for training, argv in ((True, ["--data", training_files]), (False, [])):
            args = parse(training, ["--task", name, "--eval-data", evaluation, *argv])
            with pytest.raises(ValueError, match=match):
                resolve_data(args, tokenizers[name], training=training)
    evaluation = write_jsonl(tmp_path / "ok.jsonl", SST2_EVAL)
    args = parse(True, ["--task", "sst2", "--data", train, "--eval-data", evaluation])
    assert resolve_data(args, tokenizers["sst2"], training=True).train == SST2_EVAL


# --- 2-3. the switch-base-32 recipe: examples and options checked before training ----------------------------------
SENTENCES = [("experts are great and fast", 1), ("the router is slow and bad", 0), ("merged experts are great", 1),
             ("a bad slow model", 0), ("fast great routers", 1), ("slow bad experts", 0)]
PROMPT = "Question: Was that sentence positive or negative? Answer:"


@pytest.fixture
def recipe_space(tmp_path, monkeypatch):
    """A tiny Switch and its tokenizer, and train() replaced by a refusal: a test that reaches it failed."""
    tiny_tokenizer(" ".join([s for s, _ in SENTENCES] + [PROMPT])).save_pretrained(tmp_path / "switch")
    torch.manual_seed(0)
    tiny_switch().save_pretrained(tmp_path / "switch")

    def train(*args, **kwargs):
        raise AssertionError("training started before the refusal")

    monkeypatch.setattr(mcsmoe_fast.train, "train", train)
    return tmp_path


def run_recipe(space, data, *extra):
    rows = [{"sentence": s, "label": y} for s, y in SENTENCES]
    (space / "data").mkdir(exist_ok=True)
    for split, change in (("train", data.get("train")), ("validation", data.get("validation"))):
        write_jsonl(space / "data" / f"{split}.jsonl", change(rows) if change else rows)
    return load_recipe("switch_base_32_mcsmoe").main(
        ["--model", space / "switch", "--task", "sst2", "--data-dir", space / "data", "--out", space / "run",
         "--finetune-steps", 4, "--merge-steps", 1, "--compress-steps", 1, "--eval-every", 4, "--batch-size", 3,
         "--calib-samples", 4, "--num-groups", 2, "--rank", 2, "--quiet", *extra])


def test_switch_recipe_checks_training_and_validation_examples_before_training(recipe_space, capsys):
    unlabelled = lambda rows: [{**r, "label": -1} for r in rows]  # noqa: E731
    one_more = lambda rows: rows + [{**rows[0], "label": -1}]  # noqa: E731
    refusal = "sst2: the example has no label/answer"
    for data, match in (({"validation": unlabelled}, f"validation.jsonl: evaluation example 0: {refusal}"),
                        ({"train": one_more}, f"train.jsonl: training example 6: {refusal}")):
        assert run_recipe(recipe_space, data) == 2
        err = capsys.readouterr().err
        assert match in err, err
    assert not (recipe_space / "run").exists()


@pytest.mark.parametrize("flag,values", [("--batch-size", ("0", "-1")), ("--lr", ("0.0", "-1.0"))])
def test_switch_recipe_refuses_zero_batch_size_and_learning_rate(recipe_space, capsys, flag, values):
    bound = ">= 1" if flag == "--batch-size" else "> 0"
    for value in values:
        assert run_recipe(recipe_space, {}, flag, value) == 2
        err = capsys.readouterr().err
        assert f"{flag} must be {bound}, got {value}" in err, err
    assert not (recipe_space / "run").exists()


# --- 4. harness_evaluate keeps the caller's modes and tokenizer -----------------------------------------------------
def test_harness_evaluate_restores_the_callers_modes_and_tokenizer(tmp_path):
    pytest.importorskip("lm_eval")
    from mcsmoe_fast.tasks.harness import harness_evaluate
    from mcsmoe_fast.tiny import tiny_mixtral
    from test_cli_merge import tiny_tokenizer as lines_tokenizer
    from test_compare_lm_eval import task_perplexity, write_task

    docs = write_task(tmp_path / "tasks")
    model = tiny_mixtral().train()
    model.model.embed_tokens.eval()  # a part the caller keeps in eval mode
    tokenizer = lines_tokenizer()
    tokenizer.pad_token = None  # lm-eval gives a tokenizer without one the unknown token as its pad token
    modes = [(name, m.training) for name, m in model.named_modules()]
    vocabulary = tokenizer.get_vocab()
    scores = harness_evaluate(model, tokenizer, ["tiny_ll"], include_path=tmp_path / "tasks")
    assert [(name, m.training) for name, m in model.named_modules()] == modes
    assert tokenizer.pad_token is None and tokenizer.get_vocab() == vocabulary
    reference = task_perplexity(copy.deepcopy(model).eval(), tokenizer, docs)  # still scored in eval mode
    assert scores["tiny_ll/perplexity"] == pytest.approx(reference, rel=1e-6)
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        harness_evaluate(model, tokenizer, ["tiny_ll"], batch_size=0, include_path=tmp_path / "tasks")


# --- 5. predict_task on no examples ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name,examples", [("sst2", SST2_EVAL), ("copa", COPA_EVAL), ("squad", SQUAD_EVAL)])
def test_predict_task_on_no_examples_predicts_nothing(name, examples):
    task = get_task(name)
    for label_scoring in (True, False):
        assert predict_task(tiny_switch(), task_tokenizer(task, examples), task, [], label_scoring=label_scoring,
                            progress=False) == []


# --- 6. calibration_batches: examples= or path= / split=, not both ----------------------------------------------------
def test_calibration_batches_refuse_path_or_split_beside_examples(tmp_path):
    sst2 = get_task("sst2")
    tok = task_tokenizer(sst2, SST2_EVAL)
    other = write_jsonl(tmp_path / "other.jsonl", [{"sentence": "other data", "label": 0}])
    for given in ({"path": other}, {"split": "validation"}, {"path": other, "split": "train"}):
        named = "path=" if "path" in given else "split="
        with pytest.raises(ValueError, match=f"calibration_batches: give examples= or {named}"):
            calibration_batches(sst2, tok, n=4, examples=SST2_EVAL[:4], **given)
    from_file = calibration_batches(sst2, tok, n=4, path=other)
    assert from_file[0]["input_ids"].shape[0] == 1  # the file's one example
    assert sum(b["input_ids"].shape[0] for b in calibration_batches(sst2, tok, n=4, examples=SST2_EVAL)) == 4


# --- minor: CSV int cells hold ASCII digits ---------------------------------------------------------------------------
def test_csv_int_cells_hold_digits(tmp_path):
    for cell in ("1_0", "\u0661", "1.0", "0x1"):  # int() would read the first two as 10 and 1
        (tmp_path / "a.csv").write_text(f"sentence,label\ngreat film,{cell}\n", encoding="utf-8")
        with pytest.raises(ValueError, match=rf"a.csv:2: column 'label' must be an integer, got '{cell}'"):
            load_task_data("sst2", path=tmp_path / "a.csv")
    (tmp_path / "a.csv").write_text("sentence,label\ngreat film,1\nbad film, -1 \n")
    assert load_task_data("sst2", path=tmp_path / "a.csv") == [{"sentence": "great film", "label": 1},
                                                               {"sentence": "bad film", "label": -1}]
