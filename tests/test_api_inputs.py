"""The Python steps given the models and arguments users have in hand: a torch.compile'd model, frozen experts, an
eval-mode model, a caller's torch.inference_mode or torch.autocast, a model without weights (meta), a pruner
stepped without gradients, strings for boolean options, a single string of calibration text. Each either works as
on the plain model, or is refused by name before anything changes."""
from __future__ import annotations

import pytest
import torch

import mcsmoe_fast as mf
from mcsmoe_fast.tiny import tiny_mixtral, tiny_switch, tiny_tokenizer
from merge_helpers import calibration, forward


def merged(model, groups=2):
    stats = mf.collect_routing_stats(model, calibration(model, seed=1), progress=False)
    mf.merge_experts(model, stats, groups, progress=False)
    return model


def test_a_compiled_model_is_worked_on_in_the_module_it_compiles(tmp_path):
    model = tiny_mixtral(seed=2).eval()
    compiled = torch.compile(model, backend="eager")
    batches = calibration(model, seed=1)
    stats = mf.collect_routing_stats(compiled, batches, progress=False)
    assert list(stats) == [layer.name for layer in mf.moe_layers(model)] == [l.name for l in mf.moe_layers(compiled)]
    assert not any(name.startswith("_orig_mod") for name in stats)
    pruned = mf.prune_experts(compiled, mf.collect_routing_stats(model, batches, saliency="reap", progress=False),
                              num_experts=4)
    assert pruned.config.num_local_experts == 4
    mf.merge_experts(compiled, stats, 2, progress=False)
    expected = forward(model, batches[0])
    loaded = mf.from_pretrained(mf.save_pretrained(compiled, tmp_path / "merged"))
    torch.testing.assert_close(forward(loaded, batches[0]), expected)
    standard = mf.save_pretrained(compiled, tmp_path / "standard", format="standard", router="dominant")
    assert (standard / "config.json").exists()
    assert mf.optimize(compiled) is compiled


@pytest.mark.parametrize("build", [tiny_mixtral, tiny_switch])
def test_merged_and_compressed_experts_keep_the_models_mode_and_frozen_experts(build):
    model = build(seed=3).eval()
    model.requires_grad_(False)
    merged(model)
    mf.compress_experts(model, rank=2, keep_ratio=0.5, progress=False)
    for layer in mf.moe_layers(model):
        experts = layer.module.experts
        assert not experts.training and not any(m.training for m in experts.modules()), layer.name
        assert not any(p.requires_grad for p in experts.parameters()), layer.name
    trainable = build(seed=3).train()
    merged(trainable)
    for layer in mf.moe_layers(trainable):
        assert layer.module.experts.training and all(p.requires_grad for p in layer.module.experts.parameters())


@pytest.mark.parametrize("step", ["merge", "compress", "prune"])
def test_steps_run_under_inference_mode_leave_a_model_that_trains(step):
    model = tiny_mixtral(seed=4)
    batches = calibration(model, seed=1)
    if step == "compress":
        merged(model)
    reap = mf.collect_routing_stats(model, batches, saliency="reap", progress=False) if step == "prune" else None
    with torch.inference_mode():
        if step == "merge":
            merged(model)
        elif step == "compress":
            mf.compress_experts(model, rank=2, keep_ratio=0.5, progress=False)
        else:
            model = mf.prune_experts(model, reap, num_experts=4)
    assert not any(t.is_inference() for t in (*model.parameters(), *model.buffers()))
    model.train()
    ids = batches[0]["input_ids"]
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for layer in mf.moe_layers(model) for p in layer.module.experts.parameters()
               if p.requires_grad)


def test_compress_under_autocast_decomposes_in_the_weights_precision():
    plain, under = merged(tiny_mixtral(seed=5)), merged(tiny_mixtral(seed=5))
    mf.compress_experts(plain, rank=3, keep_ratio=0.3, progress=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mf.compress_experts(under, rank=3, keep_ratio=0.3, progress=False)
    for (name, a), b in zip(plain.state_dict().items(), under.state_dict().values()):
        assert a.dtype == b.dtype and torch.equal(a, b), name


@pytest.mark.parametrize("step", ["align", "merge", "compress"])
def test_a_model_without_weights_is_refused_by_name(step):
    with torch.device("meta"):
        model = tiny_mixtral(seed=6)
    stats = mf.collect_routing_stats(tiny_mixtral(seed=6), calibration(tiny_mixtral(), seed=1), progress=False)
    run = {"align": lambda: mf.align_experts(model, progress=False),
           "merge": lambda: mf.merge_experts(model, stats, 2, progress=False),
           "compress": lambda: mf.compress_experts(model, rank=2, progress=False)}[step]
    with pytest.raises(ValueError, match=r"the expert weights of layers \['model.layers.0.mlp', 'model.layers.1.mlp'\] "
                                         r"are on the meta device"):
        run()


def test_the_pruner_refuses_a_step_without_gradients():
    model = merged(tiny_mixtral(seed=7))
    mf.compress_experts(model, rank=2, importance="gradient", progress=False)
    pruner = mf.CompressionPruner(model, keep_ratio=0.5, total_steps=4)
    with pytest.raises(ValueError, match=r"CompressionPruner.step\(\): no compressed expert's sparse rows have a "
                                         r"gradient: call it after loss.backward\(\) and before optimizer.zero_grad"):
        pruner.step()
    assert pruner.step(update_scores=False) == pruner.kept_fraction(2)  # a skipped optimizer step is fine
    ids = calibration(model, seed=1)[0]["input_ids"]
    model(input_ids=ids, labels=ids).loss.backward()
    pruner.step()


@pytest.mark.parametrize("option", ["globally", "permute", "within_routing_groups"])
def test_boolean_options_given_as_strings_are_refused(option):
    model = tiny_mixtral(seed=8)
    stats = mf.collect_routing_stats(model, calibration(model, seed=1), progress=False)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=f"merge_experts: {option} must be True or False, got 'no'"):
        mf.merge_experts(model, stats, 2, progress=False, **{option: "no"})
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    with pytest.raises(ValueError, match="collect_routing_stats: input_norms must be True or False, got 'no'"):
        mf.collect_routing_stats(model, calibration(model, seed=1), progress=False, input_norms="no")


def test_a_single_calibration_string_is_refused():
    with pytest.raises(ValueError, match="texts must be a list of strings, one calibration text each"):
        mf.calibration_batches("the quick brown fox", tiny_tokenizer())
    assert len(mf.calibration_batches(["the quick brown fox"], tiny_tokenizer())) == 1


def test_the_methods_entry_points_are_the_packages():
    from mcsmoe_fast.prune import prune_experts
    from mcsmoe_fast.ream import ream_experts

    assert mf.prune_experts is prune_experts and mf.ream_experts is ream_experts
    assert {"prune_experts", "ream_experts"} <= set(mf.__all__)


def test_a_compiled_model_trains_saves_and_resumes(tmp_path):
    """Checkpoints of a compiled model hold the compiled module's names; a resume loads them into it."""
    from mcsmoe_fast.train import TrainConfig, train

    model = torch.compile(tiny_mixtral(seed=2), backend="eager")
    data = [{"input_ids": torch.arange(3, 11), "labels": torch.arange(3, 11)}] * 4

    def collate(rows):
        return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}

    train(model, data, TrainConfig(steps=1, batch_size=2, eval_every=0), output_dir=tmp_path / "run",
          progress=False, collate_fn=collate)
    saved = mf.from_pretrained(tmp_path / "run" / "latest").state_dict()
    assert saved.keys() == model._orig_mod.state_dict().keys()
    result = train(model, data, TrainConfig(steps=2, batch_size=2, eval_every=0), output_dir=tmp_path / "run",
                   resume=True, progress=False, collate_fn=collate)
    assert result.step == 2
