"""A pruned (compressed) student's run stopped after the checkpoint of step 6 and resumed: the pruner
goes on from step 6 of its schedule, so the kept share after every later step, and at the end, is the
paper's schedule computed by hand, and the result equals an uninterrupted run.

The stop is an exception from the evaluation callback, which runs right after `latest` is written;
every TrainConfig and pruner setting is given explicitly."""
import pytest
import torch

from mcsmoe_fast import compress_experts, from_pretrained
from mcsmoe_fast.modules.compressed import CompressedMoEExperts
from mcsmoe_fast.train import TrainConfig, resumable_step, train
from train_helpers import collate, perplexity_on, tiny_job_data, tiny_job_model

STEPS, KEEP, INITIAL, FINAL = 12, 0.25, 0, 3


class Stopped(Exception):
    pass


def config() -> TrainConfig:
    return TrainConfig(steps=STEPS, batch_size=8, learning_rate=5e-3, warmup_steps=2, weight_decay=0.01, adam_eps=1e-6,
                       adam_betas=(0.9, 0.98), max_grad_norm=1.0, train_routers=False, kd_lambda=0.2, temperature=2.0,
                       task_lambda=1.0, hd_lambda=0.0, eval_every=3, metric="perplexity", greater_is_better=False,
                       keep_ratio=KEEP, prune_initial_warmup=INITIAL, prune_final_warmup=FINAL, seed=0,
                       mixed_precision="no")


def hand_schedule(step):
    """The paper's kept fraction after optimizer step `step` (1-based)."""
    if step <= INITIAL:
        return 1.0
    if step > STEPS - FINAL:
        return KEEP
    progress = (step - INITIAL) / (STEPS - FINAL - INITIAL)
    return KEEP + (1 - KEEP) * (1 - progress) ** 3


def modules(model):
    return [m for m in model.modules() if isinstance(m, CompressedMoEExperts)]


def kept_share(model):
    """(kept share of S's entries, entries of the longest row / all entries), masked or finalized."""
    mods = modules(model)
    entries = sum(m.in_U.shape[0] * (m.in_U.shape[1] * m.in_V.shape[2] + m.out_U.shape[1] * m.out_V.shape[2])
                  for m in mods)
    kept = 0
    for m in mods:
        for side in ("in", "out"):
            rows, keep = getattr(m, f"{side}_S_rows"), getattr(m, f"{side}_keep")
            kept += (rows.shape[0] if keep is None else int(keep.sum())) * rows.shape[1]
    longest = max(max(m.in_S_rows.shape[1], m.out_S_rows.shape[1]) for m in mods)
    return kept / entries, longest / entries


def run(output_dir, stop_at=None, resume=False):
    model, data = tiny_job_model(), tiny_job_data()
    compress_experts(model, rank=4, keep_ratio=0.5, importance="gradient", svd="exact", progress=False)
    shares = {}

    def callback(m, record):
        shares[record["step"]] = kept_share(m)
        if record["step"] == stop_at:
            raise Stopped(stop_at)

    result = train(model, data, config(), collate_fn=collate, eval_fn=perplexity_on(data), output_dir=output_dir,
                   resume=resume, progress=False, callback=callback)
    return model, result, shares


def assert_on_schedule(shares, step, what):
    share, row = shares
    want = hand_schedule(step)
    assert want - row < share <= want + 1e-12, f"{what}: kept share {share:.4f}, scheduled {want:.4f} (step {step})"


def test_resumed_pruned_run_continues_the_schedule_and_ends_at_the_keep_ratio(tmp_path):
    with pytest.raises(Stopped):
        run(tmp_path / "run", stop_at=6)
    assert resumable_step(tmp_path / "run") == 6
    resumed, result, shares = run(tmp_path / "run", resume=True)
    assert result.step == STEPS and sorted(shares) == [9, 12]
    for step in (9, 12):
        assert_on_schedule(shares[step], step, f"after resuming at step 6, step {step}")
    assert not any(m.pruning for m in modules(resumed))
    assert_on_schedule(kept_share(resumed), STEPS, "the finalized resumed model")
    assert_on_schedule(kept_share(from_pretrained(tmp_path / "run" / "latest")), STEPS, "the saved latest checkpoint")

    straight, _, _ = run(tmp_path / "straight")
    for a, b in zip(modules(resumed), modules(straight)):
        for side in ("in", "out"):
            assert torch.equal(getattr(a, f"{side}_row_idx"), getattr(b, f"{side}_row_idx")), \
                "the resumed run keeps other rows than the uninterrupted one"
    for (name, a), b in zip(resumed.state_dict().items(), straight.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


@pytest.fixture
def deterministic(monkeypatch):
    monkeypatch.delenv("MCSMOE_AUTOTUNE", raising=False)  # timing on, as outside the tests (conftest turns it off)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)


def test_resume_is_bit_exact_under_deterministic_algorithms(tmp_path, deterministic):
    """The compressed op's choices by measurement round differently per candidate, so the winner (and the trial
    calls before it) would make a resumed process end a little elsewhere; under torch.use_deterministic_algorithms
    no decision is timed and the resumed run ends bit for bit where the uninterrupted one does. Each run starts
    from an empty choice cache, as a new process does."""
    from mcsmoe_fast import ops

    ops.autotune_reset()
    with pytest.raises(Stopped):
        run(tmp_path / "run", stop_at=6)
    ops.autotune_reset()
    resumed, _, _ = run(tmp_path / "run", resume=True)
    ops.autotune_reset()
    straight, _, _ = run(tmp_path / "straight")
    assert ops.autotune_choices() == []
    for (name, a), b in zip(resumed.state_dict().items(), straight.state_dict().values()):
        assert torch.equal(a, b), name
