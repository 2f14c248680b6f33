"""Training and compression that drifted from their definitions: a resumed run must end where an uninterrupted one
ends also with dropout on (the loader's epoch iterator drew from the global RNG after it was restored), models come
back from train() without accelerate's autocast wrapper, a second run in another mixed precision works, bad clipping
norms and never-pruning schedules are refused, text perplexity refuses encoder-decoder models, no expert bias is
weight-decayed (merged / compressed b_in, b_out included), and S = W - U V is formed in float32 for bf16 weights."""
import pytest
import torch

from mcsmoe_fast import collect_routing_stats, compress_experts, merge_experts
from mcsmoe_fast.compress import full_bank
from mcsmoe_fast.tiny import tiny_mixtral, tiny_moe, tiny_switch
from mcsmoe_fast.train import TrainConfig, train
from mcsmoe_fast.train.loop import _optimizer, _pruner
from mcsmoe_fast.train.text import perplexity


def switch_data():
    g = torch.Generator().manual_seed(1)
    data = [(torch.randint(3, 100, (6,), generator=g), torch.randint(3, 100, (4,), generator=g)) for _ in range(24)]
    return data, lambda b: {"input_ids": torch.stack([x[0] for x in b]), "labels": torch.stack([x[1] for x in b])}


class Stop(Exception):
    pass


@pytest.mark.parametrize("stop_at", [4, 6], ids=["mid-epoch", "epoch-boundary"])
def test_a_run_with_dropout_resumed_mid_epoch_ends_where_the_uninterrupted_one_does(tmp_path, stop_at):
    make = lambda: tiny_switch(num_experts=4, d_model=16, d_ff=32, num_layers=2, seed=0)  # noqa: E731
    data, collate = switch_data()
    config = lambda: TrainConfig(steps=10, batch_size=4, eval_every=2, learning_rate=3e-3, warmup_steps=1)  # noqa: E731
    score = lambda m: {"perplexity": 1.0}  # noqa: E731
    whole = make()
    assert whole.config.dropout_rate > 0
    train(whole, data, config(), collate_fn=collate, eval_fn=score, output_dir=tmp_path / "a", progress=False)

    def stop(model, record):
        if record["step"] == stop_at:
            raise Stop

    with pytest.raises(Stop):
        train(make(), data, config(), collate_fn=collate, eval_fn=score, output_dir=tmp_path / "b", progress=False,
              callback=stop)
    resumed = make()
    train(resumed, data, config(), collate_fn=collate, eval_fn=score, output_dir=tmp_path / "b", resume=True,
          progress=False)
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_models_come_back_without_autocast_and_a_second_precision_runs():
    g = torch.Generator().manual_seed(1)
    data = [torch.randint(0, 40, (12,), generator=g) for _ in range(8)]
    collate = lambda rows: {"input_ids": torch.stack(rows), "labels": torch.stack(rows)}  # noqa: E731
    student = tiny_mixtral(num_experts=4, hidden_size=32, intermediate_size=48, seed=1)
    teacher = tiny_mixtral(num_experts=4, hidden_size=32, intermediate_size=48, seed=0)
    x = collate(data)
    with torch.no_grad():
        before = teacher(**x).logits
    for precision in ("bf16", "no", "bf16"):
        train(student, data, TrainConfig(steps=1, batch_size=8, eval_every=0, mixed_precision=precision),
              collate_fn=collate, teacher=teacher, progress=False)
        assert "forward" not in vars(teacher) and "forward" not in vars(student)
        with torch.no_grad():
            assert torch.equal(teacher(**x).logits, before)
            assert torch.equal(student(**x).logits, type(student).forward(student, **x).logits)


@pytest.mark.parametrize("norm", [-1.0, 0.0, float("nan")])
def test_clipping_norms_that_are_not_positive_are_refused(norm):
    with pytest.raises(ValueError, match="max_grad_norm must be > 0"):
        TrainConfig(max_grad_norm=norm)
    assert TrainConfig(max_grad_norm=None).max_grad_norm is None


def test_a_schedule_that_would_never_prune_is_refused():
    model = tiny_mixtral(num_experts=4)
    compress_experts(model, rank=2, keep_ratio=1.0, importance="gradient", progress=False)
    config = lambda keep, initial: TrainConfig(steps=3, keep_ratio=keep, prune_initial_warmup=initial,  # noqa: E731
                                               prune_final_warmup=0)
    with pytest.raises(ValueError, match=r"prune_initial_warmup \(3\) must be below steps \(3\)"):
        _pruner(model, config(0.1, 3))
    assert _pruner(model, config(1.0, 3)) is not None  # keeping everything needs no pruning
    assert _pruner(model, config(0.1, 2)).initial_warmup == 2


def test_text_perplexity_refuses_an_encoder_decoder_model():
    with pytest.raises(ValueError, match="perplexity on text windows is for causal LMs; "
                                         "SwitchTransformersForConditionalGeneration is an encoder-decoder"):
        perplexity(tiny_switch(), torch.randint(3, 100, (2, 8)))


def test_no_expert_bias_is_weight_decayed():
    compressed = tiny_moe("gpt_oss", num_experts=4, hidden_size=32, intermediate_size=24)
    compress_experts(compressed, rank=4, keep_ratio=0.5, importance="gradient", progress=False)
    merged = tiny_moe("gpt_oss", num_experts=4, hidden_size=32, intermediate_size=24)
    ids = torch.randint(3, 120, (2, 8), generator=torch.Generator().manual_seed(0))
    stats = collect_routing_stats(merged, [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}], progress=False)
    merge_experts(merged, stats, 2, globally=False, progress=False)
    for model in (compressed, merged):
        optimizer = _optimizer(model, TrainConfig(steps=10, weight_decay=0.01), distilling=True)
        decay = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
        biases = [(n, p) for n, p in model.named_parameters() if n.endswith((".b_in", ".b_out"))]
        assert biases and all(decay[id(p)] == 0.0 for _, p in biases)
        matrices = [p for n, p in model.named_parameters() if n.endswith(("in_U", "q_proj.weight"))]
        assert matrices and all(decay[id(p)] == 0.01 for p in matrices)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_sparse_residual_of_half_precision_weights_is_rounded_once(dtype):
    g = torch.Generator().manual_seed(0)
    A = (torch.randn(4, 256, 8, generator=g) @ torch.randn(4, 8, 128, generator=g) * 0.02
         + 0.002 * torch.randn(4, 256, 128, generator=g))
    W = A.to(dtype)
    U, V, S_rows, _, _ = full_bank(W, 8, "exact")
    UV = U.float() @ V.float()
    assert torch.equal(S_rows.reshape(W.shape), (W.float() - UV).to(dtype))  # W - U V in float32, rounded once


@pytest.mark.parametrize("gpus", [1, 2])
def test_a_checkpoint_carries_every_gpus_generator_state(tmp_path, monkeypatch, gpus):
    """On a GPU, dropout and router jitter draw from the GPU's generator: a resume restores it too. No GPU here, so
    torch.cuda's state functions are stood in for (their plumbing is what is checked)."""
    from mcsmoe_fast.train.state import restore_state, write_state

    states = [torch.randint(0, 255, (16,), dtype=torch.uint8, generator=torch.Generator().manual_seed(i))
              for i in range(gpus)]
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [s.clone() for s in states])
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda new: restored.extend(new))
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    write_state(tmp_path, {"step": 3}, optimizer, scheduler)
    assert restore_state(tmp_path, optimizer, scheduler)["step"] == 3
    assert len(restored) == gpus and all(torch.equal(a, b) for a, b in zip(restored, states))
    restored.clear()
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus + 1)  # another machine: left as it is
    restore_state(tmp_path, optimizer, scheduler)
    assert restored == []
