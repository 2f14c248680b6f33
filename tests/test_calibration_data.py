"""Calibration data (calibration_data.py): batches padded and truncated as documented, pad-token fallbacks,
and `datasets` sources read with the given split and text field (local data files, no download)."""
import json

import pytest
import torch

from mcsmoe_fast.calibration_data import calibration_batches, read_calibration_texts
from test_cli_merge import LINES, tiny_tokenizer

TEXTS = [  # 9, 3, 1, 7 and 4 words: every word is in the tiny tokenizer's vocabulary
    "the quick brown fox jumps over the lazy dog",
    "routers still score",
    "calibration",
    "mixture of experts models are sparse and",
    "a merged expert is",
]


def plain_ids(tokenizer, text):
    """The token ids of one text on its own: no padding, no truncation."""
    return tokenizer(text)["input_ids"]


@pytest.mark.parametrize("batch_size,max_length", [(2, 4), (2, 100), (3, 1), (5, 6), (8, 5)])
def test_batches_are_padded_to_the_longest_and_truncated_to_max_length(batch_size, max_length):
    tok = tiny_tokenizer()
    assert tok.padding_side == "right" and tok.truncation_side == "right"
    batches = calibration_batches(TEXTS, tok, batch_size=batch_size, max_length=max_length)
    assert len(batches) == -(-len(TEXTS) // batch_size)
    texts = iter(TEXTS)
    for batch in batches:
        assert set(batch) == {"input_ids", "attention_mask"}
        chunk = [next(texts) for _ in range(batch["input_ids"].shape[0])]
        assert len(chunk) == min(batch_size, len(TEXTS) - TEXTS.index(chunk[0]))
        rows = [plain_ids(tok, t)[:max_length] for t in chunk]  # truncation keeps the first tokens
        width = max(len(r) for r in rows)  # padded to the longest sample of the batch, not to max_length
        assert batch["input_ids"].shape == batch["attention_mask"].shape == (len(chunk), width)
        for row, ids, mask in zip(rows, batch["input_ids"], batch["attention_mask"]):
            n = len(row)
            assert ids[:n].tolist() == row and mask[:n].tolist() == [1] * n
            assert ids[n:].tolist() == [tok.pad_token_id] * (width - n) and mask[n:].tolist() == [0] * (width - n)
    assert next(texts, None) is None  # every text in order, none twice


def test_every_sample_is_kept_in_order():
    tok = tiny_tokenizer()
    batches = calibration_batches(LINES * 3, tok, batch_size=4, max_length=256)
    assert [len(b["input_ids"]) for b in batches] == [4, 4, 4, 3]
    real = [ids[mask.bool()].tolist() for b in batches for ids, mask in zip(b["input_ids"], b["attention_mask"])]
    assert real == [plain_ids(tok, t) for t in LINES * 3]


def test_pad_token_falls_back_to_eos_then_unk():
    tok = tiny_tokenizer()
    tok.pad_token = None
    batches = calibration_batches(TEXTS[:2], tok, batch_size=2)
    assert tok.pad_token is None  # the caller's tokenizer is left as it was (tests/test_loading_fidelity2.py)
    pad = batches[0]["input_ids"][1][~batches[0]["attention_mask"][1].bool()]
    assert pad.tolist() == [tok.convert_tokens_to_ids("[EOS]")] * 6
    tok = tiny_tokenizer()
    tok.pad_token = None
    tok.eos_token = None
    batches = calibration_batches(TEXTS[:2], tok, batch_size=2)
    pad = batches[0]["input_ids"][1][~batches[0]["attention_mask"][1].bool()]
    assert pad.tolist() == [tok.convert_tokens_to_ids("[UNK]")] * 6
    tok = tiny_tokenizer()
    tok.pad_token = tok.eos_token = tok.unk_token = None
    with pytest.raises(ValueError, match="no pad, eos or unk token"):
        calibration_batches(TEXTS[:2], tok)


def test_bad_batch_size_and_max_length():
    tok = tiny_tokenizer()
    for kwargs in (dict(batch_size=0), dict(max_length=0), dict(batch_size=-1, max_length=5)):
        with pytest.raises(ValueError, match="batch_size and max_length must be >= 1"):
            calibration_batches(TEXTS, tok, **kwargs)
    assert len(calibration_batches(TEXTS, tok, batch_size=1, max_length=1)) == 5


# --- datasets sources ------------------------------------------------------------------------------
SPLITS = {
    "train": [{"sentence": t, "label": i} for i, t in enumerate(LINES)],
    "validation": [{"sentence": "  routers still score  ", "label": 0}, {"sentence": "", "label": 1},
                   {"sentence": "   ", "label": 2}, {"sentence": "calibration text", "label": 3},
                   {"sentence": "a merged expert", "label": 4}],
}


@pytest.fixture
def local_dataset(tmp_path, monkeypatch):
    """A `datasets` dataset built from local JSON-lines files (a train and a validation split), served
    under the dataset name "local/calib" (config "small" too); returns the list of load_dataset calls."""
    datasets = pytest.importorskip("datasets")
    files = {}
    for split, records in SPLITS.items():
        files[split] = str(tmp_path / f"{split}.jsonl")
        (tmp_path / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    real = datasets.load_dataset
    calls = []

    def load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        if path != "local/calib":
            raise FileNotFoundError(f"Dataset '{path}' doesn't exist on the Hub (offline test)")
        return real("json", data_files=files, split=split, cache_dir=str(tmp_path / "cache"))

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    return calls


def test_dataset_split_and_text_field_are_honoured(local_dataset):
    texts = read_calibration_texts("local/calib", 10, text_field="sentence", split="validation")
    assert texts == ["routers still score", "calibration text", "a merged expert"]  # stripped, empty ones skipped
    assert local_dataset[-1] == ("local/calib", None, "validation")
    assert read_calibration_texts("local/calib", 2, text_field="sentence") == LINES[:2]  # split train by default
    assert local_dataset[-1] == ("local/calib", None, "train")
    assert read_calibration_texts("local/calib:small", 10, "sentence", "train") == LINES
    assert local_dataset[-1] == ("local/calib", "small", "train")


def test_dataset_errors_name_the_column_and_the_split(local_dataset):
    with pytest.raises(ValueError, match=r"no column 'text'.*sentence"):
        read_calibration_texts("local/calib", 10)  # text_field defaults to "text"
    with pytest.raises(ValueError, match="no non-empty text"):
        read_calibration_texts("local/calib", 10, text_field="label")  # not strings: skipped
    with pytest.raises(ValueError, match=r"could not load calibration dataset 'local/calib' \(split 'test'\)"):
        read_calibration_texts("local/calib", 10, text_field="sentence", split="test")
    with pytest.raises(ValueError, match="could not load calibration dataset 'other/name'"):
        read_calibration_texts("other/name", 10)


def test_local_dataset_directory_is_a_calibration_source(tmp_path):
    pytest.importorskip("datasets")
    data = tmp_path / "calib-data"
    data.mkdir()
    for split, records in SPLITS.items():
        (data / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    texts = read_calibration_texts(str(data), 10, text_field="sentence", split="validation")
    assert texts == ["routers still score", "calibration text", "a merged expert"]
