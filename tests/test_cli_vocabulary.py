"""A --tokenizer that is not the model's (token ids past its embedding) is refused by every command before any work,
naming the text that has them: the calibration text, the training and evaluation texts, KD's text (an IndexError
deep inside the embedding otherwise: eval, finetune after loading, compare's baseline perplexity). And compare's
--offload-dir naming a file is refused as merge and prune refuse it."""
from __future__ import annotations

import random
from argparse import Namespace

import pytest

from mcsmoe_fast.cli import main
from mcsmoe_fast.tiny import TINY_WORDS, tiny_mixtral, tiny_tokenizer

WORDS = TINY_WORDS.split()
EXTRA = [f"w{i:03d}" for i in range(200)]  # past the tiny models' 128 ids


@pytest.fixture(scope="module")
def space(tmp_path_factory):
    root = tmp_path_factory.mktemp("vocabulary")
    tiny_mixtral().save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    big = tiny_tokenizer(" ".join(WORDS + EXTRA))
    big.save_pretrained(root / "big")
    inside = [w for w in WORDS + EXTRA if big.convert_tokens_to_ids(w) < 128]
    outside = [w for w in WORDS + EXTRA if big.convert_tokens_to_ids(w) >= 128]
    rng = random.Random(0)
    (root / "outside.txt").write_text(" ".join(rng.choice(outside) for _ in range(400)))
    (root / "inside.txt").write_text(" ".join(rng.choice(inside) for _ in range(400)))
    (root / "calib.txt").write_text("\n".join(" ".join(rng.choice(inside) for _ in range(12)) for _ in range(6)))
    (root / "notes.txt").write_text("mine")
    return root


def run(argv, capsys):
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err


COMPARE = ["compare", "--calib", "calib.txt", "--methods", "m-smoe", "--ratios", "0.5", "--eval-length", "16",
           "--out", "out"]


@pytest.mark.parametrize("argv,named", [
    (["eval", "--eval-text", "outside.txt", "--length", "16"], "outside.txt"),
    (["finetune", "--text", "inside.txt", "--eval-text", "outside.txt", "--length", "16", "--steps", "1", "--out",
      "out"], "outside.txt"),
    (["finetune", "--text", "outside.txt", "--eval-text", "inside.txt", "--length", "16", "--steps", "1", "--out",
      "out"], "outside.txt"),
    ([*COMPARE, "--eval-text", "outside.txt"], "outside.txt"),
    ([*COMPARE, "--eval-text", "outside.txt", "--max-memory", "1KB"], "outside.txt"),
    (["merge", "--calib", "outside.txt", "--num-groups", "2", "--out", "out"], "the tokenizer produces token id"),
    (["merge", "--calib", "outside.txt", "--num-groups", "2", "--out", "out", "--max-memory", "1KB"],
     "the tokenizer produces token id"),
    (["prune", "--calib", "outside.txt", "--num-experts", "2", "--out", "out", "--max-memory", "1KB"],
     "the tokenizer produces token id"),
])
def test_ids_past_the_embedding_are_refused_naming_the_text(space, capsys, monkeypatch, tmp_path, argv, named):
    monkeypatch.chdir(space)
    argv = [tmp_path / "out" if a == "out" else a for a in argv]
    rc, err = run([*argv, "--model", "model", "--tokenizer", "big"], capsys)
    assert rc == 2 and "but the model's vocabulary has 128 entries" in err and named in err, err
    assert not (tmp_path / "out").exists()


def test_texts_inside_the_vocabulary_run(space, capsys, monkeypatch):
    """The same options with the text inside the vocabulary: the refusals above are the ids', not the options'."""
    monkeypatch.chdir(space)
    rc, err = run(["eval", "--eval-text", "inside.txt", "--length", "16", "--model", "model", "--tokenizer", "big"],
                  capsys)
    assert rc == 0, err


def test_kd_windows_from_the_calibration_text_are_checked(space):
    from mcsmoe_fast.calibration_data import load_tokenizer
    from mcsmoe_fast.cli.compare import kd_windows

    args = Namespace(kd_text=None, eval_length=8)
    texts = [(space / "outside.txt").read_text()]
    assert kd_windows(args, texts, load_tokenizer(str(space / "model")), 128).rows.shape[1] == 8
    with pytest.raises(ValueError, match=r"the calibration text \(KD's text without --kd-text\): the tokenizer "
                                         r"produces token id 2\d\d but the model's vocabulary has 128"):
        kd_windows(args, texts, load_tokenizer(str(space / "big")), 128)


def test_compare_offload_dir_naming_a_file_is_refused(space, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(space)
    rc, err = run([*COMPARE[:-1], tmp_path / "out", "--eval-text", "inside.txt", "--model", "model", "--max-memory",
                   "1KB", "--offload-dir", "notes.txt"], capsys)
    assert rc == 2 and "offload_dir notes.txt is a file, not a directory" in err, err
    assert (space / "notes.txt").read_text() == "mine" and not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["eval", "finetune"])
def test_task_examples_past_the_embedding_are_refused_naming_the_file(tmp_path, capsys, command):
    """--task: the examples' sources, targets and answer choices (here a word past the embedding in the sentences
    of one file at a time: the evaluation file for eval, the training file for finetune)."""
    from mcsmoe_fast.tiny import tiny_switch
    from test_tasks import SST2_EVAL, write_jsonl

    tiny_switch().save_pretrained(tmp_path / "switch")
    words = " ".join(ex["sentence"] for ex in SST2_EVAL).replace(".", " ")
    tiny_tokenizer(" ".join([*EXTRA, words, TINY_WORDS, "positive negative sst2 sentence:"])).save_pretrained(
        tmp_path / "big")
    good = write_jsonl(tmp_path / "good.jsonl", SST2_EVAL)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{**ex, "sentence": ex["sentence"] + " w199"} for ex in SST2_EVAL])
    files = ["--eval-data", bad] if command == "eval" else ["--data", bad, "--eval-data", good, "--steps", "1",
                                                             "--out", tmp_path / "out"]
    rc, err = run([command, "--task", "sst2", *files, "--model", tmp_path / "switch", "--tokenizer", tmp_path / "big"],
                  capsys)
    assert rc == 2 and "bad.jsonl: the tokenizer produces token id" in err and "vocabulary has 128" in err, err
    assert not (tmp_path / "out").exists()
    if command == "eval":  # the same tokenizer on the examples without the word: evaluated
        rc, err = run([command, "--task", "sst2", "--eval-data", good, "--model", tmp_path / "switch", "--tokenizer",
                       tmp_path / "big"], capsys)
        assert rc == 0, err
