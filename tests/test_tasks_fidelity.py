"""Task data and evaluation that went silently wrong or failed late (the tasks audit): values inside object
columns taken unchecked, a COPA question other than cause/effect read as "effect", choices the label scoring
cannot tell apart answered by the first, lengths below one, files with a UTF-8 byte-order mark, and the eval /
finetune options checked only after the work (--json, training examples, --length, --lm-eval names)."""
import argparse
import json
import re
import sys
import types

import pytest
import torch

from mcsmoe_fast.cli.data_options import add_data_options, resolve_data
from mcsmoe_fast.tasks import evaluate_task, get_task, load_task_data, predict_task
from mcsmoe_fast.tiny import TINY_WORDS, tiny_switch, tiny_tokenizer
from test_cli_merge import run
from test_tasks import COPA_EVAL, EXAMPLES, SQUAD_EVAL, SST2_EVAL, task_tokenizer, write_jsonl


# --- 1. values inside object columns ----------------------------------------------------------------------
@pytest.mark.parametrize("name,change,match", [
    ("squad", {"answers": {"text": "Denver Broncos", "answer_start": [0]}},
     r"squad.jsonl:1: column 'answers.text' must be a list of strings, got 'Denver Broncos'"),
    ("squad", {"answers": {"text": ["Denver", 3]}}, r"column 'answers.text' must be a list of strings"),
    ("hotpotqa", {"context": {"title": ["Arthur's Magazine"], "sentences": ["Alpha beta. Gamma."]}},
     r"hotpotqa.jsonl:1: column 'context.sentences' must be a list of lists of strings, got \['Alpha beta. Gamma.'\]"),
    ("hotpotqa", {"supporting_facts": {"title": ["Arthur's Magazine"], "sent_id": ["0"]}},
     r"hotpotqa.jsonl:1: column 'supporting_facts.sent_id' must be a list of integers, got \['0'\]"),
    ("hotpotqa", {"supporting_facts": {"title": ["Arthur's Magazine"], "sent_id": [True]}},
     r"column 'supporting_facts.sent_id' must be a list of integers"),
    ("hotpotqa", {"supporting_facts": {"title": "Arthur's Magazine", "sent_id": [0]}},
     r"column 'supporting_facts.title' must be a list of strings"),
    ("hotpotqa", {"supporting_facts": {"title": ["Arthur's Magazine", "First for Women"], "sent_id": [0]}},
     r"hotpotqa.jsonl:1: column 'supporting_facts': title and sent_id must have one entry each, got 2 and 1"),
    ("hotpotqa", {"context": {"title": ["Arthur's Magazine"], "sentences": []}},
     r"column 'context': title and sentences must have one entry each, got 1 and 0"),
    ("multirc", {"idx": {"paragraph": "0", "question": 0, "answer": 0}},
     r"multirc.jsonl:1: column 'idx.paragraph' must be an integer, got '0'"),
])
def test_values_inside_object_columns_are_checked(tmp_path, name, change, match):
    path = write_jsonl(tmp_path / f"{name}.jsonl", [{**EXAMPLES[name], **change}])
    with pytest.raises(ValueError, match=match):
        load_task_data(name, path=path)


def test_object_columns_of_csv_files_are_checked_inside_too(tmp_path):
    (tmp_path / "squad.csv").write_text('context,question,answers\nDenver won,who won,"{""text"": ""Denver""}"\n')
    with pytest.raises(ValueError, match=r"squad.csv:2: column 'answers.text' must be a list of strings, got 'Denver'"):
        load_task_data("squad", path=tmp_path / "squad.csv")
    for name in ("squad", "hotpotqa", "multirc"):  # well-formed examples still load as they are
        assert load_task_data(name, path=write_jsonl(tmp_path / f"{name}.jsonl", [EXAMPLES[name]])) == [EXAMPLES[name]]


# --- 2. COPA's question ------------------------------------------------------------------------------------
def test_copa_question_must_be_cause_or_effect():
    copa = get_task("copa")
    assert copa.source({**EXAMPLES["copa"], "question": "cause"}).endswith("We are looking for  a cause")
    assert copa.source({**EXAMPLES["copa"], "question": "effect"}).endswith("We are looking for  an effect")
    for question in ("Cause", "causes", ""):
        with pytest.raises(ValueError, match=f"question {question!r}: expected \"cause\" or \"effect\""):
            copa.source({**EXAMPLES["copa"], "question": question})


# --- 3. choices the label scoring cannot tell apart ----------------------------------------------------------
def test_label_scoring_refuses_choices_that_tokenize_alike():
    sst2, model = get_task("sst2"), tiny_switch()
    tok = task_tokenizer(sst2, SST2_EVAL, add_eos=True)
    with pytest.raises(ValueError, match=r"sst2 example 0: the choices 'negative', 'positive' have the same token "
                                         r"ids \[1\] .*max_target_length=1"):
        evaluate_task(model, tok, sst2, SST2_EVAL, max_target_length=1, progress=False)
    assert len(predict_task(model, tok, sst2, SST2_EVAL, max_target_length=2, progress=False)) == len(SST2_EVAL)
    copa = get_task("copa")
    tok = task_tokenizer(copa, COPA_EVAL)
    unknown = {**COPA_EVAL[1], "choice1": "Zebras.", "choice2": "Yaks."}  # both one [UNK]
    with pytest.raises(ValueError, match=r"copa example 1: the choices 'Zebras.', 'Yaks.' have the same token ids"):
        predict_task(model, tok, copa, [COPA_EVAL[0], unknown, COPA_EVAL[2]], progress=False)
    # generated answers are compared as text: nothing to tell apart by score
    assert len(predict_task(model, tok, copa, [unknown], label_scoring=False, max_new_tokens=2, progress=False)) == 1


# --- 4. lengths below one --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,examples", [("sst2", SST2_EVAL), ("squad", SQUAD_EVAL)])
@pytest.mark.parametrize("lengths", [dict(max_source_length=0), dict(max_source_length=-3),
                                     dict(max_target_length=0)])
def test_prediction_refuses_lengths_below_one(name, examples, lengths):
    task = get_task(name)
    tok = task_tokenizer(task, examples, add_eos=True)
    for call in (predict_task, evaluate_task):
        with pytest.raises(ValueError, match="max_source_length and max_target_length must be >= 1, got"):
            call(tiny_switch(), tok, task, examples, max_new_tokens=2, progress=False, **lengths)


# --- 5. UTF-8 byte-order mark ----------------------------------------------------------------------------------
def test_files_with_a_utf8_byte_order_mark_load(tmp_path):
    expected = [{"sentence": "great film", "label": 1}]
    for name, text in (("a.csv", "sentence,label\ngreat film,1\n"), ("a.jsonl", json.dumps(expected[0]) + "\n"),
                       ("a.json", json.dumps(expected))):
        (tmp_path / name).write_bytes(b"\xef\xbb\xbf" + text.encode())
        assert load_task_data("sst2", path=tmp_path / name) == expected, name


# --- 6-9. the eval / finetune options ---------------------------------------------------------------------------
@pytest.fixture
def switch_dir(tmp_path):
    tok = tiny_tokenizer(" ".join(ex["sentence"] for ex in SST2_EVAL) + " Question: Was that sentence positive or "
                                                                        "negative? Answer:")
    torch.manual_seed(0)
    tiny_switch().save_pretrained(tmp_path / "switch")
    tok.save_pretrained(tmp_path / "switch")
    write_jsonl(tmp_path / "sst2.jsonl", SST2_EVAL)
    return tmp_path


def test_eval_refuses_an_unwritable_json_before_loading_the_model(switch_dir, capsys, monkeypatch):
    import mcsmoe_fast.loading

    loaded = []
    monkeypatch.setattr(mcsmoe_fast.loading, "open_model", lambda *a, **k: loaded.append(a) or tiny_switch())
    base = ["eval", "--model", switch_dir / "switch", "--task", "sst2", "--eval-data", switch_dir / "sst2.jsonl"]
    for bad, match in ((switch_dir / "missing" / "r.json", "its directory .*missing does not exist"),
                       (switch_dir, "is a directory")):
        rc, out, err = run([*base, "--json", bad], capsys)
        assert rc == 2 and f"--json {bad}" in err and "accuracy" not in out, (out, err)
        assert re.search(match, err), err
    assert not loaded
    rc, out, err = run([*base, "--json", switch_dir / "r.json"], capsys)
    assert rc == 0, err
    assert json.loads((switch_dir / "r.json").read_text()) == {"accuracy": pytest.approx(float(out.split()[-1]),
                                                                                         abs=1e-4)}


def parse(training, argv):
    parser = argparse.ArgumentParser()
    add_data_options(parser, training=training)
    return parser.parse_args([str(a) for a in argv])


def test_finetune_checks_every_training_example_before_training(tmp_path):
    sst2 = get_task("sst2")
    rows = [{**ex, "label": -1 if i == 4 else ex["label"]} for i, ex in enumerate(SST2_EVAL)]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    evaluation = write_jsonl(tmp_path / "eval.jsonl", SST2_EVAL)
    tok = task_tokenizer(sst2, SST2_EVAL)
    args = parse(True, ["--task", "sst2", "--data", train, "--eval-data", evaluation])
    with pytest.raises(ValueError, match=r"train.jsonl: training example 4: sst2: the example has no label/answer"):
        resolve_data(args, tok, training=True)
    write_jsonl(train, [{**EXAMPLES["copa"], "question": "Cause"}])
    args = parse(True, ["--task", "copa", "--data", train, "--eval-data", write_jsonl(tmp_path / "c.jsonl", COPA_EVAL)])
    with pytest.raises(ValueError, match=r"training example 0: question 'Cause'"):
        resolve_data(args, tok, training=True)
    write_jsonl(train, SST2_EVAL)
    data = resolve_data(parse(True, ["--task", "sst2", "--data", train, "--eval-data", evaluation]), tok, True)
    assert data.train == SST2_EVAL


def test_length_is_refused_where_no_text_window_is_read(tmp_path):
    tok = tiny_tokenizer()
    evaluation = write_jsonl(tmp_path / "eval.jsonl", SST2_EVAL)
    for training, argv in ((False, ["--task", "sst2", "--eval-data", evaluation]),
                           (True, ["--task", "sst2", "--data", evaluation, "--eval-data", evaluation]),
                           (False, ["--lm-eval", "arc_easy"])):
        with pytest.raises(ValueError, match="--length .*--text or --eval-text"):
            resolve_data(parse(training, [*argv, "--length", 5]), tok, training)
    (tmp_path / "held_out.txt").write_text((TINY_WORDS + " ") * 40)
    data = resolve_data(parse(False, ["--eval-text", tmp_path / "held_out.txt"]), tok, False)
    rows = next(c.cell_contents for c in data.evaluate.__closure__ if hasattr(c.cell_contents, "shape"))
    assert rows.shape[1] == 256  # the default window


@pytest.fixture
def fake_task_registry(monkeypatch):
    """lm-eval's TaskManager knowing arc_easy and hellaswag (indexing the real one takes half a minute), and
    harness_evaluate recording the tasks it is asked for."""
    import mcsmoe_fast.tasks.harness as harness

    class TaskManager:
        def __init__(self, include_path=None):
            self.all_tasks = ["arc_easy", "hellaswag"]

    module = types.ModuleType("lm_eval.tasks")
    module.TaskManager = TaskManager
    monkeypatch.setitem(sys.modules, "lm_eval.tasks", module)
    asked = []
    monkeypatch.setattr(harness, "harness_evaluate", lambda model, tokenizer, tasks, *a, **k: asked.append(tasks) or {})
    return asked


def test_eval_lm_eval_checks_task_names_and_splits_commas(fake_task_registry):
    with pytest.raises(ValueError, match=r"lm-eval does not know the task\(s\) \['hellaswg'\]"):
        resolve_data(parse(False, ["--lm-eval", "hellaswg"]), None, training=False)
    for argv in (["arc_easy,hellaswag"], ["arc_easy", "hellaswag"], ["arc_easy, hellaswag,"]):
        resolve_data(parse(False, ["--lm-eval", *argv]), None, training=False).evaluate(None)
    assert fake_task_registry == [["arc_easy", "hellaswag"]] * 3
