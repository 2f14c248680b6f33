"""Results that must not depend on incidental things (session 36's invariance audit; each test failed before its
fix): evaluating a task leaves the caller's tokenizer as it was (fine-tuning saved one that cut every input to 512
tokens), and different seeds draw different data orders in every epoch (seed s's second epoch was seed s+1's
first), while a run saved before that change resumes in its own order."""
import json

import pytest
import torch

from mcsmoe_fast.tasks.evaluate import predict_task
from mcsmoe_fast.tiny import TINY_WORDS, tiny_mixtral, tiny_switch, tiny_tokenizer
from mcsmoe_fast.train import TrainConfig, train
from mcsmoe_fast.train.state import STATE_JSON

WORDS = TINY_WORDS.split()


@pytest.mark.parametrize("label_scoring", [True, False], ids=["label_scoring", "generation"])
def test_an_evaluation_leaves_the_tokenizer_as_it_was(tmp_path, label_scoring):
    tok = tiny_tokenizer()
    before = (tok.backend_tokenizer.truncation, tok.backend_tokenizer.padding)
    g = torch.Generator().manual_seed(0)
    examples = [{"sentence": " ".join(WORDS[int(j)] for j in torch.randint(0, len(WORDS), (n,), generator=g)),
                 "label": i % 2, "idx": i} for i, n in enumerate((3, 9, 14, 5))]
    predict_task(tiny_switch(), tok, "sst2", examples, batch_size=2, label_scoring=label_scoring, progress=False,
                 max_source_length=7, max_new_tokens=2)
    assert (tok.backend_tokenizer.truncation, tok.backend_tokenizer.padding) == before == (None, None)
    tok.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "tokenizer.json").read_text())
    assert saved["truncation"] is None and saved["padding"] is None
    assert len(tok(" ".join(WORDS[:12]))["input_ids"]) > 7  # not cut to the evaluation's max_source_length


def data_order(seed, steps=12, output_dir=None, resume=False):
    """The first value of every row of every batch train() draws (24 samples, 6 batches an epoch), in the order
    they are collated (accelerate's loader fetches one batch ahead)."""
    seen = []

    def collate(rows):
        seen.append(tuple(int(r[0]) for r in rows))
        ids = torch.stack(rows)
        return {"input_ids": ids, "labels": ids}

    model = tiny_mixtral(num_experts=4, hidden_size=16, intermediate_size=16, num_layers=1, seed=0)
    train(model, [torch.full((6,), i) for i in range(24)],
          TrainConfig(steps=steps, batch_size=4, eval_every=0, warmup_steps=1, seed=seed),
          collate_fn=collate, progress=False, output_dir=output_dir, resume=resume)
    return seen, model


def test_different_seeds_draw_different_orders_in_every_epoch():
    s0, _ = data_order(0)
    s1, _ = data_order(1)
    assert s0[6:12] != s1[:6]  # seed 0's second epoch against seed 1's first
    assert s0[:6] != s1[:6]
    assert data_order(0)[0] == s0  # the same seed, the same order


def test_a_run_saved_before_data_seed_resumes_in_its_own_order(tmp_path, monkeypatch):
    """A saved record without data_seed shuffled with the seed itself: its resume keeps that order."""
    import mcsmoe_fast.train.loop as loop

    monkeypatch.setattr(loop, "data_seed", lambda seed: seed)  # the order before data_seed
    old_order, _ = data_order(1, steps=9)
    data_order(1, steps=6, output_dir=tmp_path)
    monkeypatch.undo()
    record = json.loads((tmp_path / "latest" / STATE_JSON).read_text())
    record.pop("data_seed")  # as an old run saved it
    (tmp_path / "latest" / STATE_JSON).write_text(json.dumps(record))
    resumed, _ = data_order(1, steps=9, output_dir=tmp_path, resume=True)
    assert resumed[:3] == old_order[6:9]  # (accelerate's loader fetches one batch ahead)
    assert data_order(1, steps=9)[0][6:9] != old_order[6:9]  # today's order differs: the record decided
