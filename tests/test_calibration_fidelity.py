"""Calibration as the model itself runs: the drop baseline's statistics count the masked gate's own choice, read-only
passes leave every submodule's training flag as it was, a tokenizer's BatchEncoding is a batch, the accumulator keeps
no autograd graph; calibration files with a byte-order mark, options a file source would ignore, and dataset names
read as a stream."""
import json
import math
import sys
import types

import pytest
import torch

import mcsmoe_fast.calibrate as calibrate
from mcsmoe_fast.calibrate import collect_routing_stats, layer_accumulator
from mcsmoe_fast.calibration_data import read_calibration_texts
from mcsmoe_fast.drop import install_logit_mask
from mcsmoe_fast.hooks import hook_block_input
from mcsmoe_fast.models import moe_layers
from mcsmoe_fast.tasks import get_task, predict_task
from mcsmoe_fast.tiny import tiny_mixtral, tiny_moe, tiny_switch, tiny_tokenizer
from mcsmoe_fast.train.text import perplexity
from test_eval_correctness import sst2_examples
from test_tasks import task_tokenizer


def batch_of(ids: torch.Tensor, mask: torch.Tensor | None = None) -> dict:
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids) if mask is None else mask}


# --- 1. the drop baseline: the statistics count the experts the masked gate itself chooses ----------------------------
@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "olmoe"])
def test_masked_layer_statistics_count_the_gates_own_choice(family):
    """Two router rows 1e-6 apart: their float32 probabilities tie and the gate keeps the lower index, where a top-k of
    the float64 logits would keep the other. Reference: the top-k index the block hands its experts module."""
    model = tiny_moe(family, num_experts=4, top_k=1, num_layers=1)
    layer = moe_layers(model)[0]
    gate = layer.module.gate
    with torch.no_grad():
        gate.weight[1] = gate.weight[0]
        gate.weight[1, 0] += 1e-6
    install_logit_mask(layer, torch.tensor([True, True, True, False]))
    ref = torch.zeros(4, dtype=torch.float64)

    def record(module, args):  # the block hands its experts (hidden, top_k_index, top_k_weights)
        ref.add_(torch.bincount(args[1].reshape(-1), minlength=4))

    handle = layer.module.experts.register_forward_pre_hook(record)
    ids = torch.randint(3, 120, (16, 64), generator=torch.Generator().manual_seed(0))
    stats = collect_routing_stats(model, [batch_of(ids)], progress=False)[layer.name]
    handle.remove()
    assert ref.sum() == ids.numel() and ref[3] == 0
    assert torch.equal(stats.counts, ref)


def test_masked_picks_that_fill_k_are_not_selections():
    """One expert kept, top-2: the gate's second pick is a masked expert; only the kept one counts."""
    model = tiny_mixtral(num_experts=4, num_layers=1, top_k=2)
    layer = moe_layers(model)[0]
    install_logit_mask(layer, torch.tensor([False, False, True, False]))
    ids = torch.randint(3, 120, (2, 9), generator=torch.Generator().manual_seed(1))
    stats = collect_routing_stats(model, [batch_of(ids)], progress=False)[layer.name]
    assert stats.counts.tolist() == [0, 0, ids.numel(), 0]


# --- 2. read-only passes restore every submodule's training flag ------------------------------------------------------
def partly_frozen(model):
    """A model in training mode with parts kept in eval (a frozen embedding and first layer, as in fine-tuning)."""
    model.train()
    inner = model.model if hasattr(model, "model") else model
    (inner.embed_tokens if hasattr(inner, "embed_tokens") else inner.shared).eval()
    (inner.layers[0] if hasattr(inner, "layers") else inner.encoder.block[0]).eval()
    return {name: m.training for name, m in model.named_modules()}


def changed_modes(model, before: dict) -> list[str]:
    return [name for name, m in model.named_modules() if m.training != before[name]]


def test_routing_statistics_restore_every_submodules_training_flag():
    model = tiny_mixtral(num_experts=4)
    before = partly_frozen(model)
    ids = torch.randint(3, 120, (2, 6), generator=torch.Generator().manual_seed(0))
    collect_routing_stats(model, [batch_of(ids)], progress=False)
    assert changed_modes(model, before) == []


def test_perplexity_restores_every_submodules_training_flag():
    model = tiny_mixtral(num_experts=4)
    before = partly_frozen(model)
    perplexity(model, torch.randint(3, 120, (3, 8), generator=torch.Generator().manual_seed(0)))
    assert changed_modes(model, before) == []


def test_perplexity_builds_no_autograd_graph():
    """perplexity is a measurement: its forwards run under no_grad, whatever the caller's grad mode."""
    model = tiny_mixtral(num_experts=4)
    modes = []
    handle = model.register_forward_hook(lambda module, args, out: modes.append(torch.is_grad_enabled()))
    perplexity(model, torch.randint(3, 120, (3, 8), generator=torch.Generator().manual_seed(0)))
    handle.remove()
    assert modes == [False]


def test_task_predictions_restore_every_submodules_training_flag():
    task, examples = get_task("sst2"), sst2_examples(4)
    tok = task_tokenizer(task, examples, add_eos=True)
    model = tiny_switch(num_experts=4)
    before = partly_frozen(model)
    predict_task(model, tok, task, examples, batch_size=2, progress=False)
    assert changed_modes(model, before) == []


# --- 3. a tokenizer's BatchEncoding is a batch ------------------------------------------------------------------------
def test_a_tokenizers_batch_encoding_is_a_calibration_batch():
    tok = tiny_tokenizer()
    enc = tok(["the quick brown fox jumps", "a lazy dog"], padding=True, return_tensors="pt",
              return_token_type_ids=False)
    assert not isinstance(enc, dict)
    model = tiny_mixtral(num_experts=4)
    ref = collect_routing_stats(model, [dict(enc)], progress=False)
    got = collect_routing_stats(model, [enc], progress=False)
    assert ref.keys() == got.keys()
    for name in ref:
        assert torch.equal(got[name].counts, ref[name].counts)
        assert torch.equal(got[name].logit_gram, ref[name].logit_gram)


def test_a_batch_that_is_no_mapping_is_refused_by_name():
    with pytest.raises(ValueError, match=r"batches must yield mappings of model inputs \(dicts\), got tuple"):
        collect_routing_stats(tiny_mixtral(num_experts=4), [(torch.ones(1, 3, dtype=torch.long),)], progress=False)


# --- 4. which decoder tokens count: as the module docstring says ------------------------------------------------------
def test_decoder_tokens_counted_are_those_the_docstring_names():
    doc = " ".join(calibrate.__doc__.split())
    assert "else every decoder token" not in doc
    assert "`labels != -100`" in doc and "every decoder token when it gives `decoder_input_ids` without a mask" in doc
    model = tiny_switch(num_experts=4, num_layers=2)
    ids = torch.randint(3, 120, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1] * 6, [1, 1, 0, 0, 0, 0]])
    labels = torch.tensor([[5, 6, 7, -100], [8, -100, -100, -100]])

    def decoder_tokens(batch):
        stats = collect_routing_stats(model, [batch], progress=False)
        return next(s.tokens for name, s in stats.items() if name.startswith("decoder."))

    assert decoder_tokens(batch_of(ids, mask)) == 8  # the decoder reads the input text: its attention_mask
    assert decoder_tokens({**batch_of(ids, mask), "labels": labels}) == 4  # labels != -100
    assert decoder_tokens({**batch_of(ids, mask), "decoder_input_ids": ids[:, :3]}) == 6  # every decoder token


# --- 5. calibration files with a UTF-8 byte-order mark ----------------------------------------------------------------
def test_a_byte_order_mark_is_not_part_of_the_first_sample(tmp_path):
    txt, jsonl = tmp_path / "calib.txt", tmp_path / "calib.jsonl"
    txt.write_text("first sample\nsecond sample\n", encoding="utf-8-sig")
    jsonl.write_text('{"text": "first sample"}\n{"text": "second sample"}\n', encoding="utf-8-sig")
    assert txt.read_bytes().startswith(b"\xef\xbb\xbf")
    assert read_calibration_texts(str(txt)) == ["first sample", "second sample"]
    assert read_calibration_texts(str(jsonl)) == ["first sample", "second sample"]


# --- 6. options a file source would ignore are refused by name --------------------------------------------------------
def test_split_and_text_field_a_file_would_ignore_are_refused(tmp_path):
    txt, jsonl = tmp_path / "calib.txt", tmp_path / "calib.jsonl"
    txt.write_text("a\nb\n")
    jsonl.write_text('{"sentence": "a"}\n')
    with pytest.raises(ValueError, match=r"split 'validation'.*calib\.txt is a file"):
        read_calibration_texts(str(txt), split="validation")
    with pytest.raises(ValueError, match=r"split 'validation'.*calib\.jsonl is a file"):
        read_calibration_texts(str(jsonl), text_field="sentence", split="validation")
    with pytest.raises(ValueError, match=r"text_field 'sentence'.*\.jsonl files and datasets only"):
        read_calibration_texts(str(txt), text_field="sentence")
    assert read_calibration_texts(str(jsonl), text_field="sentence") == ["a"]  # a .jsonl's field is read


def test_the_cli_defaults_of_split_and_text_field_are_not_refused(tmp_path):
    import argparse

    from mcsmoe_fast.cli.common import add_calibration_options

    parser = argparse.ArgumentParser()
    add_calibration_options(parser)
    args = parser.parse_args([])
    txt = tmp_path / "calib.txt"
    txt.write_text("a\nb\n")
    assert read_calibration_texts(str(txt), args.num_samples, args.text_field, args.split) == ["a", "b"]


# --- 7. a dataset name is read as a stream ----------------------------------------------------------------------------
@pytest.fixture
def stand_in_datasets(monkeypatch):
    """A stand-in `datasets` whose load_dataset records its arguments and returns a plain iterable (no column_names,
    as an IterableDataset may have), counting the records drawn from it."""
    calls, drawn = [], []

    def records():
        for i in range(10_000):
            drawn.append(i)
            yield {"text": "" if i % 3 == 0 else f" line {i} ", "id": i}

    class Stream:
        def __iter__(self):
            return records()

    def load_dataset(path, name=None, **kwargs):
        calls.append({"path": path, "name": name, **kwargs})
        return Stream()

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    return calls, drawn


def test_a_dataset_name_is_streamed_up_to_num_samples_texts(stand_in_datasets):
    calls, drawn = stand_in_datasets
    texts = read_calibration_texts("allenai/c4:en", num_samples=4, split="validation")
    assert texts == ["line 1", "line 2", "line 4", "line 5"]  # stripped, empty ones skipped
    assert calls == [{"path": "allenai/c4", "name": "en", "split": "validation", "streaming": True}]
    assert len(drawn) == 6  # no record read past the last one kept
    with pytest.raises(ValueError, match=r"no column 'sentence'.*'id', 'text'"):
        read_calibration_texts("allenai/c4:en", text_field="sentence")


def test_a_local_dataset_directory_is_not_streamed(stand_in_datasets, tmp_path):
    calls, _ = stand_in_datasets
    (tmp_path / "train.jsonl").write_text(json.dumps({"text": "x"}) + "\n")
    read_calibration_texts(str(tmp_path), num_samples=2)
    assert calls == [{"path": str(tmp_path), "name": None, "split": "train", "streaming": False}]


# --- 8. the accumulator keeps no autograd graph -----------------------------------------------------------------------
def test_layer_accumulator_keeps_no_autograd_graph_with_grad_enabled():
    model = tiny_mixtral(num_experts=4)
    layer = moe_layers(model)[0]
    batches = [torch.randint(3, 120, (2, 8), generator=torch.Generator().manual_seed(s)) for s in range(3)]

    def run(grad: bool):
        acc = layer_accumulator(layer, bases=("router-logits", "feature", "expert-output"), saliency="reap",
                                input_norms=True)
        handle = hook_block_input(layer.module, lambda hidden: acc(hidden, None))
        with torch.set_grad_enabled(grad):
            for ids in batches:
                model(input_ids=ids)
        handle.remove()
        return acc.finish()

    ref, got = run(False), run(True)
    for field in ("counts", "logit_gram", "feature_sum", "output_sum", "slot_input_sq", "slot_hidden_sq",
                  "saliency_sum"):
        value = getattr(got, field)
        assert not value.requires_grad, field
        assert torch.equal(value, getattr(ref, field)), field
    assert math.isclose(float(got.counts.sum()), 3 * 2 * 8 * layer.top_k)
