"""Text-to-text tasks (mcsmoe_fast/tasks): the paper's prompts on hand-written examples, metrics against
hand-computed values, local data files, training and calibration batches, and evaluation on a tiny Switch
model (random, and patched to answer perfectly so a broken metric or a misaligned batch shows)."""
import csv
import json
import types

import pytest
import torch

from mcsmoe_fast.tasks import (IGNORE_INDEX, TASKS, calibration_batches, encode_pairs, evaluate_task, get_task,
                               load_task_data, predict_task, score_predictions, shift_right, training_batches)
from mcsmoe_fast.tasks import metrics as M
from mcsmoe_fast.tasks.prompts import truncate
from mcsmoe_fast.tiny import tiny_switch

# --- the paper's prompts, written out -----------------------------------------------------------------
# (source, target) as promptsource's templates render them (the template the original chose per task).
HOTPOT_CONTEXT = {
    "title": ["Radio City", "Arthur's Magazine", "First for Women"],
    "sentences": [["Radio City is a station.", " It plays music."],
                  ["Arthur's Magazine (1844-1846) was an American literary periodical.",
                   " It was published in Philadelphia."],
                  ["First for Women is a woman's magazine.", " It was started in 1989."]],
}
EXAMPLES = {
    "sst2": {"sentence": "it 's a charming and often affecting journey . ", "label": 1, "idx": 0},
    "mrpc": {"sentence1": "Amrozi accused his brother of deliberately distorting his evidence .",
             "sentence2": "Referring to him as only \" the witness \" , Amrozi accused his brother .",
             "label": 1, "idx": 0},
    "multirc": {"paragraph": "Sara went to the store. She bought milk.", "question": "What did Sara buy?",
                "answer": "Milk", "label": 1, "idx": {"paragraph": 0, "question": 0, "answer": 0}},
    "copa": {"premise": "My body cast a shadow over the grass.", "choice1": "The sun was rising.",
             "choice2": "The grass was cut.", "question": "cause", "label": 0, "idx": 0},
    "winogrande": {"sentence": "Ian ate Dennis's menudo because _ despised eating intestine.",
                   "option1": "Ian", "option2": "Dennis", "answer": "2"},
    "squad": {"id": "5733be284776f41900661182", "title": "University_of_Notre_Dame",
              "context": "Architecturally, the school has a Catholic character.",
              "question": "What character does the school have?",
              "answers": {"text": ["a Catholic character", "Catholic"], "answer_start": [32, 34]}},
    "wikiqa": {"question_id": "Q1", "question": "how are glacier caves formed?", "document_title": "Glacier cave",
               "answer": "A glacier cave is a cave formed within the ice of a glacier .", "label": 1},
    "hotpotqa": {"id": "5a7a06935542990198eaf050",
                 "question": "Which magazine was started first, Arthur's Magazine or First for Women?",
                 "answer": "Arthur's Magazine", "type": "comparison", "level": "medium",
                 "supporting_facts": {"title": ["Arthur's Magazine", "First for Women", "First for Women",
                                                "Arthur's Magazine"], "sent_id": [0, 0, 1, 5]},
                 "context": HOTPOT_CONTEXT},
}
EXPECTED = {
    "sst2": ("it 's a charming and often affecting journey . \n"
             "Question: Was that sentence positive or negative? Answer:", "positive"),
    "mrpc": ("Does the sentence\nAmrozi accused his brother of deliberately distorting his evidence .\n"
             "paraphrase (that is, mean the same thing as) this sentence?\n"
             "Referring to him as only \" the witness \" , Amrozi accused his brother .", "yes"),
    "multirc": ("Sara went to the store. She bought milk.\n\nQuestion: What did Sara buy?\n"
                "I found this answer \"Milk\". Is that correct? Yes or no?", "Yes"),
    "copa": ("My body cast a shadow over the grass. \n\nWhat's the best option?\n- The sun was rising.\n"
             "- The grass was cut.\n\nWe are looking for  a cause", "The sun was rising."),
    "winogrande": ("The _ in the sentence below refers to Ian. True or False?\n"
                   "Ian ate Dennis's menudo because _ despised eating intestine.", "false"),
    "squad": ("Architecturally, the school has a Catholic character.\n\nQ: What character does the school have?\n\n"
              "Referring to the passage above, the correct answer to the given question is", "a Catholic character"),
    "wikiqa": ("This is a correct answer to the following question about Glacier cave. Yes or no?\n"
               "Answer: A glacier cave is a cave formed within the ice of a glacier .\n"
               "Question: how are glacier caves formed?", "Yes"),
    # supporting facts only: titles in order of first mention, out-of-range sent_id 5 skipped
    "hotpotqa": ("Answer the following question, \"Which magazine was started first, Arthur's Magazine or First for "
                 "Women?\", using the information provided below.\n\n\n"
                 "  - Arthur's Magazine (1844-1846) was an American literary periodical.\n\n"
                 "  - First for Women is a woman's magazine. It was started in 1989.", "Arthur's Magazine"),
}


def test_eight_tasks_with_the_papers_batch_size_and_learning_rate():
    table = {"sst2": (64, 1e-4), "mrpc": (32, 5e-5), "multirc": (32, 3e-5), "copa": (8, 3e-5),
             "winogrande": (32, 1e-5), "squad": (16, 5e-5), "wikiqa": (32, 5e-5), "hotpotqa": (32, 1e-4)}
    assert {name: (t.batch_size, t.learning_rate) for name, t in TASKS.items()} == table
    assert [t.name for t in TASKS.values() if not t.is_classification] == ["squad", "hotpotqa"]
    assert {name: t.metrics for name, t in TASKS.items()} == {
        "sst2": ("accuracy",), "mrpc": ("accuracy", "f1"), "multirc": ("f1_a", "f1_m", "exact_match"),
        "copa": ("accuracy",), "winogrande": ("accuracy",), "squad": ("exact_match", "f1"),
        "wikiqa": ("accuracy",), "hotpotqa": ("exact_match", "f1")}


def test_get_task_by_name_alias_or_task_and_unknown_names():
    assert get_task("SST-2") is TASKS["sst2"] and get_task("wiki_qa") is TASKS["wikiqa"]
    assert get_task("hotpot_qa") is TASKS["hotpotqa"] and get_task(TASKS["copa"]) is TASKS["copa"]
    with pytest.raises(ValueError, match=r"unknown task 'boolq'; known tasks: sst2, mrpc, multirc, copa, winogrande, "
                                         r"squad, wikiqa, hotpotqa"):
        get_task("boolq")


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_prompt_of_every_task(name):
    task = get_task(name)
    assert task.to_text(EXAMPLES[name]) == EXPECTED[name]
    assert task.source(EXAMPLES[name]) == EXPECTED[name][0]
    if task.is_classification:
        assert EXPECTED[name][1] in task.choices(EXAMPLES[name])


def test_prompt_variants_and_label_words():
    copa, wino = get_task("copa"), get_task("winogrande")
    effect = {**EXAMPLES["copa"], "question": "effect", "label": 1}
    assert copa.to_text(effect)[0].endswith("\n\nWe are looking for  an effect")
    assert copa.to_text(effect)[1] == "The grass was cut."
    assert copa.choices(effect) == ("The sun was rising.", "The grass was cut.")
    assert wino.to_text({**EXAMPLES["winogrande"], "answer": "1"})[1] == "true"
    assert get_task("sst2").to_text({"sentence": "dull", "label": 0})[1] == "negative"
    assert get_task("mrpc").choices(EXAMPLES["mrpc"]) == ("no", "yes")
    assert get_task("multirc").to_text({**EXAMPLES["multirc"], "label": 0})[1] == "No"
    assert get_task("squad").references(EXAMPLES["squad"]) == ["a Catholic character", "Catholic"]
    assert get_task("hotpotqa").references(EXAMPLES["hotpotqa"]) == ["Arthur's Magazine"]
    with pytest.raises(ValueError, match="generative"):
        get_task("squad").choices(EXAMPLES["squad"])


@pytest.mark.parametrize("name,unlabelled", [("sst2", {"label": -1}), ("copa", {"label": -1}),
                                             ("winogrande", {"answer": ""}),
                                             ("squad", {"answers": {"text": [], "answer_start": []}})])
def test_unlabelled_examples_have_a_source_but_no_target(name, unlabelled):
    task = get_task(name)
    example = {**EXAMPLES[name], **unlabelled}
    assert task.source(example) == EXPECTED[name][0]
    with pytest.raises(ValueError, match="has no label/answer"):
        task.to_text(example)


def test_out_of_range_labels_are_refused():
    with pytest.raises(ValueError, match=r"label 2 out of range.*negative, positive"):
        get_task("sst2").to_text({"sentence": "x", "label": 2})
    with pytest.raises(ValueError, match=r"answer '3'"):
        get_task("winogrande").to_text({**EXAMPLES["winogrande"], "answer": "3"})
    with pytest.raises(ValueError, match="supporting fact title 'Nowhere'"):
        get_task("hotpotqa").to_text({**EXAMPLES["hotpotqa"],
                                      "supporting_facts": {"title": ["Nowhere"], "sent_id": [0]}})


def test_fields_are_truncated_like_promptsource():
    # jinja's truncate(2048): kept up to 2053 characters; longer cut at the last space before 2045, plus "..."
    assert truncate("x" * 2053) == "x" * 2053
    long = "word " * 600  # 3000 characters
    assert truncate(long) == ("word " * 409)[:-1] + "..."  # 409 words end at 2044 (space at 2044 cut)
    assert len(truncate(long)) == 2047
    paragraph = "a " * 1500
    source = get_task("multirc").source({**EXAMPLES["multirc"], "paragraph": paragraph})
    assert source.startswith(truncate(paragraph) + "\n\nQuestion: What did Sara buy?")


# --- metrics ---------------------------------------------------------------------------------------------
def test_accuracy_and_binary_f1_by_hand():
    preds = ["yes", "yes", "no", "no", "yes", "maybe"]
    golds = ["yes", "no", "no", "yes", "yes", "yes"]
    assert M.accuracy(preds, golds) == pytest.approx(3 / 6)
    # positive "yes": tp 2, fp 1, fn 2 ("no" and the invalid "maybe" against "yes") -> 2*2 / (4 + 1 + 2)
    assert M.binary_f1(preds, golds, "yes") == pytest.approx(4 / 7)
    assert M.binary_f1(["no", "no"], ["yes", "no"], "yes") == 0.0  # no true positive
    assert M.binary_f1(["no", "no"], ["no", "no"], "yes") == 0.0  # scikit-learn's zero_division=0
    assert M.binary_f1([1, 1, 0], [1, 1, 0]) == 1.0
    # macro: class yes F1 4/7; class no tp 1 fp 1 fn 1 -> 1/2; class maybe 0
    assert M.macro_f1(preds, golds) == pytest.approx((4 / 7 + 1 / 2 + 0) / 3)
    with pytest.raises(ValueError, match="3 predictions for 2 references"):
        M.accuracy([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="no predictions"):
        M.accuracy([], [])


def test_multirc_scores_by_hand():
    # question A: 3 options, all right; question B: 2 options, one wrong
    preds = [1, 0, 1, 1, 1]
    golds = [1, 0, 1, 0, 1]
    qids = ["A", "A", "A", "B", "B"]
    scores = M.multirc_scores(preds, golds, qids)
    assert scores["exact_match"] == pytest.approx(1 / 2)
    # f1_a over all five: tp 3, fp 1, fn 0 -> 6/7
    assert scores["f1_a"] == pytest.approx(6 / 7)
    # A: macro F1 1.0; B: class 1 tp1 fp1 -> 2/3, class 0 tp0 -> 0 => 1/3
    assert scores["f1_m"] == pytest.approx((1 + 1 / 3) / 2)


def test_answer_normalisation():
    assert M.normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert M.normalize_answer("  An apple, a pear and THE end.") == "apple pear and end"
    assert M.normalize_answer("theatre another") == "theatre another"  # articles as whole words only
    assert M.normalize_answer("...") == ""


def test_exact_match_and_token_f1_by_hand():
    assert M.exact_match("the Catholic character.", ["a Catholic character"]) == 1.0
    assert M.exact_match("Catholic school", ["a Catholic character", "Catholic"]) == 0.0
    # "catholic school" vs "catholic character": 1 shared, precision 1/2, recall 1/2 -> 1/2; vs "catholic": 2/3
    assert M.token_f1("Catholic school", ["a Catholic character", "Catholic"]) == pytest.approx(2 / 3)
    assert M.token_f1("big big cat", ["big cat cat"]) == pytest.approx(2 / 3)  # counts clipped: 2 shared of 3
    assert M.token_f1("Paris", ["London"]) == 0.0
    # empty prediction: 0 against a real answer, 1 against an answer that normalises to nothing
    assert M.exact_match("", ["Paris"]) == 0.0 and M.token_f1("", ["Paris"]) == 0.0
    assert M.token_f1("", ["the"]) == 1.0 and M.exact_match("a", ["the"]) == 1.0
    scores = M.squad_scores(["Paris", "", "the big cat"], [["Paris"], ["x"], ["big dog"]])
    assert scores == pytest.approx({"exact_match": 1 / 3, "f1": (1 + 0 + 1 / 2) / 3})
    with pytest.raises(TypeError, match="list of gold answers"):
        M.exact_match("Paris", "Paris")


def test_score_predictions_per_task():
    mrpc = get_task("mrpc")
    examples = [{**EXAMPLES["mrpc"], "label": label} for label in (1, 1, 0, 0)]
    assert score_predictions(mrpc, ["yes", "no", "yes", "no"], examples) == pytest.approx(
        {"accuracy": 0.5, "f1": 0.5})
    multirc = get_task("multirc")
    options = [({"paragraph": 0, "question": 0, "answer": 0}, 1), ({"paragraph": 0, "question": 0, "answer": 1}, 0),
               ({"paragraph": 0, "question": 1, "answer": 0}, 1)]
    examples = [{**EXAMPLES["multirc"], "idx": idx, "label": label} for idx, label in options]
    assert score_predictions(multirc, ["Yes", "No", "No"], examples) == pytest.approx(
        {"f1_a": 2 / 3, "f1_m": 1 / 2, "exact_match": 1 / 2})
    # without idx the questions are told apart by their text
    no_idx = [{k: v for k, v in ex.items() if k != "idx"} for ex in examples]
    no_idx[2]["question"] = "Where did Sara go?"
    assert score_predictions(multirc, ["Yes", "No", "No"], no_idx)["exact_match"] == pytest.approx(1 / 2)
    squad = get_task("squad")
    assert score_predictions(squad, [" Catholic ", "the school"], [EXAMPLES["squad"]] * 2) == pytest.approx(
        {"exact_match": 0.5, "f1": 0.5})
    copa = get_task("copa")
    assert score_predictions(copa, ["The sun was rising.", "choice1"], [EXAMPLES["copa"]] * 2) == {"accuracy": 0.5}
    with pytest.raises(ValueError, match="1 predictions for 2 examples"):
        score_predictions(copa, ["x"], [EXAMPLES["copa"]] * 2)


# --- local data files ------------------------------------------------------------------------------------
def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_jsonl_json_and_csv_files(tmp_path):
    sst2 = [{"sentence": f"sentence {i}", "label": i % 2, "idx": i, "extra": "kept"} for i in range(5)]
    path = write_jsonl(tmp_path / "sst2.jsonl", sst2)
    assert load_task_data("sst2", path=path) == sst2
    assert load_task_data("sst2", "train", path=str(path), limit=2) == sst2[:2]
    (tmp_path / "sst2.json").write_text(json.dumps(sst2))
    assert load_task_data("sst2", path=tmp_path / "sst2.json") == sst2
    (tmp_path / "wrapped.json").write_text(json.dumps({"data": sst2[:3]}))
    assert load_task_data("sst2", path=tmp_path / "wrapped.json") == sst2[:3]

    with open(tmp_path / "squad.csv", "w", newline="") as f:  # a dict column as JSON text, int columns as digits
        writer = csv.DictWriter(f, ["id", "title", "context", "question", "answers"])
        writer.writeheader()
        writer.writerow({**EXAMPLES["squad"], "answers": json.dumps(EXAMPLES["squad"]["answers"])})
    assert load_task_data("squad", path=tmp_path / "squad.csv") == [EXAMPLES["squad"]]
    with open(tmp_path / "copa.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, list(EXAMPLES["copa"]))
        writer.writeheader()
        writer.writerow(EXAMPLES["copa"])
        writer.writerow({**EXAMPLES["copa"], "label": 1, "idx": 1})
    rows = load_task_data("copa", path=tmp_path / "copa.csv")
    assert rows == [EXAMPLES["copa"], {**EXAMPLES["copa"], "label": 1, "idx": 1}]
    assert get_task("copa").to_text(rows[0]) == EXPECTED["copa"]


def test_missing_columns_are_named(tmp_path):
    path = write_jsonl(tmp_path / "mrpc.jsonl", [EXAMPLES["mrpc"], {"sentence1": "a", "idx": 1}])
    with pytest.raises(ValueError, match=r"mrpc.jsonl:2: mrpc example has no column\(s\) sentence2, label"):
        load_task_data("mrpc", path=path)
    with open(tmp_path / "wikiqa.csv", "w", newline="") as f:
        f.write("question,answer,label\nwhy?,because,1\n")
    with pytest.raises(ValueError, match=r"wikiqa.csv: wikiqa needs the column\(s\) document_title in the CSV header"):
        load_task_data("wikiqa", path=tmp_path / "wikiqa.csv")


def test_malformed_values_name_the_line_and_column(tmp_path):
    path = write_jsonl(tmp_path / "sst2.jsonl", [{"sentence": "ok", "label": 1}, {"sentence": "bad", "label": "1"}])
    with pytest.raises(ValueError, match=r"sst2.jsonl:2: column 'label' must be an integer, got '1'"):
        load_task_data("sst2", path=path)
    with open(tmp_path / "sst2.csv", "w", newline="") as f:
        f.write("sentence,label\ngood,1\nbad,positive\n")
    with pytest.raises(ValueError, match=r"sst2.csv:3: column 'label' must be an integer, got 'positive'"):
        load_task_data("sst2", path=tmp_path / "sst2.csv")
    path = write_jsonl(tmp_path / "squad.jsonl", [{**EXAMPLES["squad"], "answers": {"answer_start": [0]}}])
    with pytest.raises(ValueError, match=r"column 'answers' has no key\(s\) text"):
        load_task_data("squad", path=path)
    (tmp_path / "broken.jsonl").write_text('{"sentence": "a", "label": 1}\n{"sentence": \n')
    with pytest.raises(ValueError, match=r"broken.jsonl:2: not valid JSON"):
        load_task_data("sst2", path=tmp_path / "broken.jsonl")
    with pytest.raises(FileNotFoundError, match="sst2 data file"):
        load_task_data("sst2", path=tmp_path / "absent.jsonl")
    (tmp_path / "data.parquet").write_text("")
    with pytest.raises(ValueError, match=r"expected a \.jsonl, \.json or \.csv file"):
        load_task_data("sst2", path=tmp_path / "data.parquet")
    with pytest.raises(ValueError, match="limit must be >= 1"):
        load_task_data("sst2", path=path, limit=0)


@pytest.fixture
def fake_hub(monkeypatch):
    """datasets.load_dataset answering from in-memory records (no download); returns the calls made."""
    datasets = pytest.importorskip("datasets")
    calls = []
    served = {("nyu-mll/glue", "sst2", "validation"): [EXAMPLES["sst2"], {**EXAMPLES["sst2"], "label": 0}] * 3,
              ("aps/super_glue", "copa", "train"): [{"premise": "p", "label": 0}]}

    def load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        if (path, name, split) not in served:
            raise FileNotFoundError(f"Dataset '{path}' is not available offline")
        return datasets.Dataset.from_list(served[(path, name, split)])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def test_hub_loading_uses_the_tasks_dataset_and_split(fake_hub):
    rows = load_task_data("sst2", "validation", limit=4)
    assert fake_hub == [("nyu-mll/glue", "sst2", "validation")]
    assert len(rows) == 4 and rows[0] == EXAMPLES["sst2"] and rows[1]["label"] == 0
    assert len(load_task_data("sst2")) == 6
    with pytest.raises(ValueError, match=r"'aps/super_glue' \(config 'copa'\) split 'train' has no column\(s\) "
                                         r"choice1, choice2, question"):
        load_task_data("copa", "train")
    with pytest.raises(ValueError, match=r"could not load squad from the hub dataset 'rajpurkar/squad', split "
                                         r"'validation'.*pass path="):
        load_task_data("squad")


# --- batches -----------------------------------------------------------------------------------------------
def word_tokenizer(texts, add_eos=False):
    """A word-level tokenizer (split on whitespace only, so "Arthur's" stays one word and decodes back) over
    the words of `texts`, with [PAD]=0, [EOS]=1, [UNK]=2; add_eos appends EOS like T5's tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.train_from_iterator(list(texts), trainers.WordLevelTrainer(special_tokens=["[PAD]", "[EOS]", "[UNK]"]))
    if add_eos:
        tok.post_processor = processors.TemplateProcessing(single="$A [EOS]", special_tokens=[("[EOS]", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", eos_token="[EOS]", unk_token="[UNK]")


def task_tokenizer(task, examples, add_eos=False):
    texts = [task.source(ex) for ex in examples]
    texts += [" ".join(task.choices(ex)) if task.is_classification else " ".join(task.references(ex))
              for ex in examples]
    tok = word_tokenizer(texts, add_eos)
    assert len(tok) <= 128, "the tiny models have 128 token ids"
    return tok


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("add_eos", [False, True])
def test_encode_pairs_pads_labels_with_ignore_index_and_ends_targets_with_eos(add_eos):
    pairs = [("one two three", "yes"), ("four", "five six seven")]
    tok = word_tokenizer([" ".join(p) for p in pairs], add_eos)
    batch = encode_pairs(tok, pairs)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    tail = [eos] if add_eos else []
    assert batch["input_ids"].tolist() == [ids(tok, "one two three") + tail, ids(tok, "four") + tail + [pad, pad]]
    assert batch["attention_mask"].tolist() == [[1] * (3 + add_eos), [1] * (1 + add_eos) + [0, 0]]
    # exactly one EOS whether or not the tokenizer adds it, then -100 (never the pad id) on padding
    assert batch["labels"].tolist() == [ids(tok, "yes") + [eos, IGNORE_INDEX, IGNORE_INDEX],
                                        ids(tok, "five six seven") + [eos]]
    short = encode_pairs(tok, pairs, max_source_length=2, max_target_length=2)
    assert short["labels"].tolist() == [ids(tok, "yes") + [eos], ids(tok, "five") + [eos]]
    assert short["input_ids"].shape == (2, 2)


def test_shift_right_matches_the_models_own():
    model = tiny_switch()
    labels = torch.tensor([[5, 6, 1, IGNORE_INDEX], [7, 8, 9, 1]])
    ours = shift_right(labels, model.config.decoder_start_token_id, model.config.pad_token_id)
    assert ours.tolist() == [[0, 5, 6, 1], [0, 7, 8, 9]]
    assert torch.equal(ours, model._shift_right(labels))


def test_training_batches_use_the_papers_batch_size():
    copa = get_task("copa")
    examples = [{**EXAMPLES["copa"], "premise": f"premise number {i}"} for i in range(10)]
    tok = task_tokenizer(copa, examples)
    batches = training_batches(copa, tok, examples)
    assert [len(b["labels"]) for b in batches] == [8, 2]  # COPA: 8 per batch
    first = batches[0]["input_ids"][0][batches[0]["attention_mask"][0].bool()].tolist()
    assert first == ids(tok, copa.source(examples[0]))
    shuffled = training_batches(copa, tok, examples, batch_size=4, shuffle=True, seed=1)
    assert [len(b["labels"]) for b in shuffled] == [4, 4, 2]
    rows = sorted(tuple(r[m.bool()].tolist()) for b in shuffled for r, m in zip(b["input_ids"], b["attention_mask"]))
    assert rows == sorted(tuple(ids(tok, copa.source(ex))) for ex in examples)  # every example once


def test_calibration_batches_feed_the_decoder_the_targets(tmp_path):
    sst2 = get_task("sst2")
    examples = [{"sentence": f"film {i} was {'good' if i % 2 else 'bad'}", "label": i % 2} for i in range(20)]
    tok = task_tokenizer(sst2, examples)
    batches = calibration_batches(sst2, tok, n=12, examples=examples, batch_size=5)
    assert [len(b["input_ids"]) for b in batches] == [5, 5, 2]
    seen = []
    for b in batches:
        assert set(b) == {"input_ids", "attention_mask", "labels", "decoder_input_ids", "decoder_attention_mask"}
        assert torch.equal(b["decoder_input_ids"], shift_right(b["labels"], tok.pad_token_id, tok.pad_token_id))
        assert b["decoder_input_ids"][:, 0].tolist() == [tok.pad_token_id] * len(b["labels"])
        assert b["decoder_input_ids"].shape != b["input_ids"].shape  # the targets, not the prompt, shifted
        assert torch.equal(b["decoder_attention_mask"], (b["labels"] != IGNORE_INDEX).long())
        for row, mask, labels in zip(b["input_ids"], b["attention_mask"], b["labels"]):
            source = row[mask.bool()].tolist()
            example = next(ex for ex in examples if ids(tok, sst2.source(ex)) == source)
            assert labels.tolist() == ids(tok, sst2.to_text(example)[1]) + [tok.eos_token_id]
            seen.append(examples.index(example))
    assert len(set(seen)) == 12  # 12 distinct examples, drawn at random with a fixed seed
    # the original's subset, in its order: datasets' shuffle(seed=2333).select(range(12))
    import datasets

    original = datasets.Dataset.from_list(examples).shuffle(seed=2333).select(range(12))
    assert seen == [examples.index(dict(ex)) for ex in original]
    def prompts(batches):
        return [tuple(r[m.bool()].tolist()) for b in batches for r, m in zip(b["input_ids"], b["attention_mask"])]

    assert prompts(calibration_batches(sst2, tok, n=12, examples=examples, batch_size=3)) == prompts(batches)
    assert prompts(calibration_batches(sst2, tok, n=12, examples=examples, seed=7)) != prompts(batches)
    # all examples when fewer than n; loading from a file through load_task_data
    path = write_jsonl(tmp_path / "train.jsonl", examples)
    from_file = calibration_batches("sst2", tok, path=path, batch_size=32)
    assert sum(len(b["labels"]) for b in from_file) == 20
    with pytest.raises(ValueError, match="n must be >= 1"):
        calibration_batches(sst2, tok, n=0, examples=examples)


def test_calibration_batches_drive_routing_statistics_over_the_target_tokens():
    from mcsmoe_fast.calibrate import collect_routing_stats

    copa = get_task("copa")
    examples = [{**EXAMPLES["copa"], "premise": f"premise {i}", "label": i % 2} for i in range(6)]
    tok = task_tokenizer(copa, examples)
    batches = calibration_batches(copa, tok, examples=examples, batch_size=4)
    stats = collect_routing_stats(tiny_switch(), batches, progress=False)
    encoder_tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    decoder_tokens = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches)
    assert decoder_tokens != encoder_tokens
    for name, layer in stats.items():
        assert layer.tokens == (decoder_tokens if name.startswith("decoder.") else encoder_tokens), name


# --- evaluation on a tiny Switch model ------------------------------------------------------------------------
SST2_EVAL = [{"sentence": text, "label": label} for text, label in [
    ("a great film", 1), ("a dull film", 0), ("great acting and a great story", 1), ("dull", 0),
    ("not great", 0), ("great", 1), ("a film", 0)]]
COPA_EVAL = [EXAMPLES["copa"],
             {"premise": "The man turned on the faucet.", "choice1": "The toilet filled with water.",
              "choice2": "Water flowed from the spout.", "question": "effect", "label": 1},
             {"premise": "I knocked on the door.", "choice1": "It was locked.", "choice2": "Someone opened it.",
              "question": "effect", "label": 1}]
SQUAD_EVAL = [EXAMPLES["squad"],
              {"context": "Paris is the capital of France.", "question": "What is the capital of France?",
               "answers": {"text": ["Paris"], "answer_start": [0]}},
              {"context": "The cat sat on the mat.", "question": "Where did the cat sit?",
               "answers": {"text": ["on the mat", "the mat"], "answer_start": [12, 15]}}]
MULTIRC_EVAL = [{**EXAMPLES["multirc"], "answer": answer, "label": label,
                 "idx": {"paragraph": 0, "question": q, "answer": a}}
                for q, a, answer, label in [(0, 0, "Milk", 1), (0, 1, "Bread", 0), (1, 0, "store", 1)]]
HOTPOT_EVAL = [EXAMPLES["hotpotqa"], {**EXAMPLES["hotpotqa"], "question": "Which magazine is for women?",
                                      "answer": "First for Women"}]


@pytest.mark.parametrize("name,examples", [("sst2", SST2_EVAL), ("copa", COPA_EVAL)])
def test_label_scoring_answers_with_a_valid_choice_for_every_example(name, examples, capsys):
    task, model = get_task(name), tiny_switch().train()
    tok = task_tokenizer(task, examples)
    predictions = predict_task(model, tok, task, examples, batch_size=2, progress=False)
    assert model.training  # evaluated without dropout, then put back in training mode
    model.eval()
    assert len(predictions) == len(examples)
    assert all(p in task.choices(ex) for p, ex in zip(predictions, examples))
    # the prediction is the choice the model finds most likely, checked with one plain forward per choice
    for prediction, example in zip(predictions, examples):
        enc = tok(task.source(example), return_tensors="pt")
        scores = []
        for choice in task.choices(example):
            labels = torch.tensor([ids(tok, choice) + [tok.eos_token_id]])
            with torch.no_grad():
                logits = model(**enc, decoder_input_ids=model._shift_right(labels)).logits
            scores.append(torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).sum().item())
        assert prediction == task.choices(example)[max(range(len(scores)), key=scores.__getitem__)]
    result = evaluate_task(model, tok, task, examples, batch_size=3, progress=False)
    golds = [task.to_text(ex)[1] for ex in examples]
    assert result == {"accuracy": pytest.approx(sum(p == g for p, g in zip(predictions, golds)) / len(examples))}
    assert capsys.readouterr().err == ""  # progress=False: no bar


def test_generation_for_generative_tasks_and_on_request():
    squad, model = get_task("squad"), tiny_switch()
    tok = task_tokenizer(squad, SQUAD_EVAL)
    calls = []
    generate = model.generate

    def recording_generate(**kwargs):
        calls.append(kwargs)
        return generate(**kwargs)

    model.generate = recording_generate
    predictions = predict_task(model, tok, squad, SQUAD_EVAL, batch_size=2, max_new_tokens=3, progress=False)
    assert len(predictions) == 3 and all(isinstance(p, str) for p in predictions)
    assert [len(c["input_ids"]) for c in calls] == [2, 1]
    assert all(c["max_new_tokens"] == 3 and c["do_sample"] is False and c["num_beams"] == 1 for c in calls)
    assert all(len(tok(p, add_special_tokens=False)["input_ids"]) <= 3 for p in predictions)
    result = evaluate_task(model, tok, squad, SQUAD_EVAL, progress=False, max_new_tokens=3)
    assert result == pytest.approx(score_predictions(squad, predictions, SQUAD_EVAL))
    calls.clear()
    sst2 = get_task("sst2")
    tok = task_tokenizer(sst2, SST2_EVAL)
    generated = predict_task(model, tok, sst2, SST2_EVAL, label_scoring=False, progress=False)
    assert len(calls) == 1 and calls[0]["max_new_tokens"] == sst2.max_new_tokens and len(generated) == 7


def perfect_model(model, task, examples, tok, wrong=False):
    """Patch `model` to know every example's answer: its encoder passes the prompt ids through, its forward
    puts all probability on the gold target's tokens, its generate returns the gold answer. wrong=True
    answers with another choice instead (so the test below can fail)."""
    from transformers.modeling_outputs import BaseModelOutput

    def answer(example):
        target = task.to_text(example)[1]
        if wrong:
            target = next(c for c in task.choices(example) if c != target)
        return ids(tok, target) + [tok.eos_token_id]

    gold = {tuple(ids(tok, task.source(ex))): answer(ex) for ex in examples}

    def lookup(row, mask):
        return gold[tuple(row[mask.bool()].long().tolist())]

    def encoder(input_ids, attention_mask, **kwargs):
        return BaseModelOutput(last_hidden_state=input_ids.unsqueeze(-1).float())

    def forward(encoder_outputs, attention_mask, decoder_input_ids, **kwargs):
        prompts = encoder_outputs.last_hidden_state[..., 0]
        logits = torch.full((*decoder_input_ids.shape, len(tok)), -20.0)
        for b in range(len(decoder_input_ids)):
            for t, token in enumerate(lookup(prompts[b], attention_mask[b])[: decoder_input_ids.shape[1]]):
                logits[b, t, token] = 20.0
        return types.SimpleNamespace(logits=logits)

    def generate(input_ids, attention_mask, **kwargs):
        rows = [[model.config.decoder_start_token_id] + lookup(r, m) for r, m in zip(input_ids, attention_mask)]
        width = max(len(r) for r in rows)
        return torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows])

    model.get_encoder = lambda: encoder
    model.forward = forward
    model.generate = generate
    return model


@pytest.mark.parametrize("name,examples", [("sst2", SST2_EVAL), ("copa", COPA_EVAL), ("multirc", MULTIRC_EVAL),
                                           ("squad", SQUAD_EVAL), ("hotpotqa", HOTPOT_EVAL)])
def test_a_perfect_model_scores_one(name, examples):
    task = get_task(name)
    tok = task_tokenizer(task, examples)
    model = perfect_model(tiny_switch(), task, examples, tok)
    result = evaluate_task(model, tok, task, examples, batch_size=2, progress=False)
    assert result == {metric: 1.0 for metric in task.metrics}
    if task.is_classification:  # generated answers are scored the same way
        generated = evaluate_task(model, tok, task, examples, label_scoring=False, progress=False)
        assert generated == {metric: 1.0 for metric in task.metrics}
        wrong = perfect_model(tiny_switch(), task, examples, tok, wrong=True)
        assert evaluate_task(wrong, tok, task, examples, progress=False)[task.primary_metric] == 0.0


def test_evaluation_refuses_unlabelled_or_no_examples():
    sst2 = get_task("sst2")
    tok = task_tokenizer(sst2, SST2_EVAL)
    with pytest.raises(ValueError, match="has no label/answer"):
        evaluate_task(tiny_switch(), tok, sst2, [{"sentence": "great", "label": -1}], progress=False)
    with pytest.raises(ValueError, match="no sst2 examples"):
        evaluate_task(tiny_switch(), tok, sst2, [], progress=False)
