"""The M-SMoE recipe's inputs as users hand them over: seq2seq batches from transformers' own collator, and
reference experts given as NumPy or torch integers."""
import numpy as np
import pytest
import torch

from mcsmoe_fast import align_experts, collect_routing_stats
from mcsmoe_fast.tiny import tiny_mixtral, tiny_switch


def test_decoder_padding_is_left_out_when_the_batch_carries_decoder_input_ids():
    """DataCollatorForSeq2Seq(model=...) gives labels (-100 on padding) and decoder_input_ids but no decoder mask:
    the decoder statistics count the target tokens only, as for the same batch without decoder_input_ids."""
    model = tiny_switch(seed=0)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 128, (2, 12), generator=g)
    labels = torch.randint(3, 128, (2, 10), generator=g)
    labels[1, 3:] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    collated = {**batch, "decoder_input_ids": model.prepare_decoder_input_ids_from_labels(labels=labels)}
    want = collect_routing_stats(model, [batch], progress=False)
    got = collect_routing_stats(model, [collated], progress=False)
    decoder = [name for name in want if name.startswith("decoder")]
    assert decoder
    for name in want:
        assert got[name].tokens == want[name].tokens, name
        assert torch.equal(got[name].frequency, want[name].frequency), name
    assert got[decoder[0]].tokens == int((labels != -100).sum())


@pytest.mark.parametrize("reference", [np.int64(2), torch.tensor(2), np.int32(2)])
def test_reference_expert_as_numpy_or_torch_integer(reference):
    want = align_experts(tiny_mixtral(seed=1), reference=2, progress=False)
    got = align_experts(tiny_mixtral(seed=1), reference=reference, progress=False)
    assert want.keys() == got.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert all(torch.equal(p[2], torch.arange(p.shape[1])) for p in got.values())


@pytest.mark.parametrize("reference", [2.5, "2", torch.tensor(2.0)])
def test_reference_that_is_not_an_expert_index_is_refused_by_name(reference):
    with pytest.raises(ValueError, match="reference"):
        align_experts(tiny_mixtral(seed=1), reference=reference, progress=False)
