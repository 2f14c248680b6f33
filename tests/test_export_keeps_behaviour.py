"""An exported model behaves as the model it was exported from: Switch's expert capacity where it binds (drop
strategy, dropless models), and the model's generation settings (eos ids, sampling defaults), in every format
and the streamed merge (session 31's audit; each test failed before its fix)."""
import json

import pytest
import torch
from transformers import GenerationConfig

import mcsmoe_fast as mf
from mcsmoe_fast.checkpoint import to_dense, to_standard
from mcsmoe_fast.checkpoint.standard import NO_CAPACITY
from mcsmoe_fast.models.hub import load_model
from mcsmoe_fast.prune import prune_experts
from mcsmoe_fast.tiny import tiny_mixtral, tiny_switch
from mcsmoe_fast.streaming.compress import compress_checkpoint
from mcsmoe_fast.streaming.permute import permute_checkpoint
from streaming_helpers import quiet_merge


def switch_batches(seed=0):
    ids = torch.randint(3, 128, (3, 10), generator=torch.Generator().manual_seed(seed))
    return [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}], dict(input_ids=ids, decoder_input_ids=ids[:, :7])


def test_switch_drop_strategy_keeps_the_capacity_of_each_kept_expert():
    """strategy="drop": each group's kept expert still takes only its own tokens, so the standard model keeps
    the original capacity (2 tokens a sequence, which binds on 10-token sequences) and computes what the merged
    model computes; a frequency merge scales it by the largest group."""
    torch.manual_seed(0)
    batches, inputs = switch_batches()
    model = tiny_switch(expert_capacity=2)
    stats = mf.collect_routing_stats(model, batches, progress=False)
    mf.merge_experts(model, stats, 4, globally=False, strategy="drop", progress=False)
    standard = to_standard(model, router="dominant")
    assert standard.config.expert_capacity == 2
    with torch.no_grad():
        torch.testing.assert_close(standard(**inputs).logits, model(**inputs).logits, rtol=1e-5, atol=1e-5)
    model = tiny_switch(expert_capacity=2)
    mf.merge_experts(model, stats, 4, globally=False, progress=False)
    config = to_standard(model, router="dominant").config
    largest = max(len(g) for layer in config.mcsmoe_standard["layers"].values() for g in layer["groups"])
    assert largest > 1 and config.expert_capacity == 2 * largest


def test_a_dropless_switch_model_exports_a_capacity_that_never_binds():
    torch.manual_seed(0)
    batches, inputs = switch_batches(1)
    model = tiny_switch(expert_capacity=2)
    stats = mf.collect_routing_stats(model, batches, progress=False)
    mf.merge_experts(model, stats, 8, globally=False, progress=False)  # groups of one: the same function
    with torch.no_grad():
        capped = model(**inputs).logits
        mf.optimize(model, dropless=True)
        ours = model(**inputs).logits
        assert not torch.allclose(capped, ours, atol=1e-3)  # the capacity binds here: dropless differs
        for exported in (to_standard(model, router="dominant"), to_dense(model)):
            assert exported.config.expert_capacity == NO_CAPACITY
            torch.testing.assert_close(exported(**inputs).logits, ours, rtol=1e-5, atol=1e-5)
        assert to_standard(model, router="dominant", expert_capacity=3).config.expert_capacity == 3  # as asked


GENERATION = dict(bos_token_id=1, eos_token_id=[2, 5], pad_token_id=0, do_sample=True, temperature=0.6, top_p=0.9,
                  max_new_tokens=77)


@pytest.fixture
def source(tmp_path):
    model = tiny_mixtral()
    model.generation_config = GenerationConfig(**GENERATION)
    model.save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def written_generation(directory):
    saved = json.loads((directory / "generation_config.json").read_text())
    return {k: saved.get(k) for k in GENERATION}


def test_every_format_writes_the_models_generation_config(source, tmp_path):
    model = load_model(str(source))
    ids = torch.randint(3, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    stats = mf.collect_routing_stats(model, [{"input_ids": ids}], progress=False)
    mf.merge_experts(model, stats, 4, globally=False, progress=False)
    for name, kwargs in (("exact", {}), ("standard", dict(format="standard", router="dominant")),
                         ("dense", dict(export_dense=True))):
        out = mf.save_pretrained(model, tmp_path / name, **kwargs)
        assert written_generation(out) == GENERATION, name
    assert mf.from_pretrained(tmp_path / "exact").generation_config.eos_token_id == [2, 5]
    pruned = prune_experts(load_model(str(source)), mf.collect_routing_stats(
        load_model(str(source)), [{"input_ids": ids}], progress=False), num_experts=2, method="frequency")
    assert pruned.generation_config.eos_token_id == [2, 5] and pruned.generation_config.max_new_tokens == 77


@pytest.mark.parametrize("format", ["exact", "standard"])
def test_the_streamed_steps_write_the_sources_generation_config(source, tmp_path, format):
    ids = torch.randint(3, 128, (2, 8), generator=torch.Generator().manual_seed(1))
    out = quiet_merge(source, tmp_path / format, [{"input_ids": ids}], 2, globally=False, format=format,
                      **({"router": "dominant"} if format == "standard" else {}))
    assert written_generation(out.path) == GENERATION
    if format == "exact":  # compressing the merged checkpoint, and permuting the source
        compress_checkpoint(out.path, tmp_path / "compressed", rank=2, keep_ratio=0.1, progress=False)
        assert written_generation(tmp_path / "compressed") == GENERATION
        permute_checkpoint(source, tmp_path / "permuted", progress=False)
        assert written_generation(tmp_path / "permuted") == GENERATION
