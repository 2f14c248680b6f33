"""CompressionPruner behaviours that no other test checked, each seen unnoticed under a one-line mutation
(benchmarks/MUTATION.md): its argument checks and their messages, the default warm-ups (none), the EMA's
values and float32 dtype, the count of skipped score updates, matrices without gradients, and rows of
zero width. Expected values are computed here from the paper's formulas, on tiny models."""
import re

import pytest
import torch
from torch import nn

from mcsmoe_fast import CompressionPruner, compress_experts
from mcsmoe_fast.tiny import tiny_mixtral
from test_pruner_schedule import matrices

BETA = 0.85


def compressed_model(dtype=torch.float32, intermediate_size=24, importance="gradient"):
    """A tiny Mixtral (1 layer, 4 experts of d=16) compressed for pruning during training."""
    model = tiny_mixtral(num_experts=4, hidden_size=16, intermediate_size=intermediate_size, num_layers=1).to(dtype)
    compress_experts(model, rank=2, keep_ratio=0.5, importance=importance, svd="exact", progress=False)
    return model


@torch.no_grad()
def set_theta_and_grads(model, theta, grads):
    for (rows, _), t, g in zip(matrices(model), theta, grads):
        rows.copy_(t)
        rows.grad = None if g is None else g.to(rows.dtype).clone()


def random_like_rows(model, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(rows.shape, generator=g) for rows, _ in matrices(model)]


# --- argument checks --------------------------------------------------------------------------------
WARMUPS = "need total_steps >= 1 and 0 <= initial_warmup + final_warmup <= total_steps, got "


@pytest.mark.parametrize("kwargs, message", [
    (dict(keep_ratio=0.0), "keep_ratio must be in (0, 1], got 0.0"),
    (dict(keep_ratio=1.5), "keep_ratio must be in (0, 1], got 1.5"),
    (dict(keep_ratio=-0.1), "keep_ratio must be in (0, 1], got -0.1"),
    (dict(keep_ratio="0.5"), "keep_ratio must be in (0, 1], got '0.5'"),
    (dict(beta=1.0), "beta must be in [0, 1), got 1.0"),
    (dict(beta=1.5), "beta must be in [0, 1), got 1.5"),
    (dict(beta=-0.1), "beta must be in [0, 1), got -0.1"),
    (dict(total_steps=0), WARMUPS + "total_steps=0, initial_warmup=0, final_warmup=0"),
    (dict(initial_warmup=-1), WARMUPS + "total_steps=4, initial_warmup=-1, final_warmup=0"),
    (dict(final_warmup=-1), WARMUPS + "total_steps=4, initial_warmup=0, final_warmup=-1"),
    (dict(initial_warmup=3, final_warmup=3), WARMUPS + "total_steps=4, initial_warmup=3, final_warmup=3"),
    (dict(initial_warmup=4, final_warmup=1), WARMUPS + "total_steps=4, initial_warmup=4, final_warmup=1"),
])
def test_bad_settings_raise_with_the_exact_message(kwargs, message):
    model = compressed_model()
    settings = dict(keep_ratio=0.5, total_steps=4, initial_warmup=0, final_warmup=0, beta=BETA) | kwargs
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        CompressionPruner(model, **settings)


def test_models_it_cannot_prune_raise_with_the_exact_message():
    plain = tiny_mixtral(num_experts=4, hidden_size=16, intermediate_size=24, num_layers=1)
    with pytest.raises(ValueError, match="^" + re.escape(
            "the model has no compressed experts: run compress_experts(model, importance='gradient')") + "$"):
        CompressionPruner(plain, keep_ratio=0.5, total_steps=4)
    finalized = compressed_model(importance="weight")
    with pytest.raises(ValueError, match="^" + re.escape(
            "1 compressed expert modules are already finalized (pruned at once); "
            "compress with importance='gradient' to prune during training") + "$"):
        CompressionPruner(finalized, keep_ratio=0.5, total_steps=4)


@pytest.mark.parametrize("keep_ratio", [1.0, 1])
def test_keep_ratio_one_is_accepted_and_keeps_every_row(keep_ratio):
    model = compressed_model()
    pruner = CompressionPruner(model, keep_ratio=keep_ratio, total_steps=3, initial_warmup=0, final_warmup=0, beta=BETA)
    for seed in range(3):
        set_theta_and_grads(model, random_like_rows(model, seed), random_like_rows(model, seed + 10))
        assert pruner.step() == 1.0
    assert all(bool(keep().all()) for _, keep in matrices(model))


def test_beta_zero_is_accepted_and_the_scores_are_the_last_importance():
    model = compressed_model()
    pruner = CompressionPruner(model, keep_ratio=0.5, total_steps=2, initial_warmup=0, final_warmup=0, beta=0.0)
    for seed in range(2):
        theta, grads = random_like_rows(model, seed), random_like_rows(model, seed + 10)
        set_theta_and_grads(model, theta, grads)
        pruner.step()
    for ema, t, g in zip(pruner.state_dict()["ema"], theta, grads):
        torch.testing.assert_close(ema, (t * g).abs(), rtol=0, atol=0)


def test_warmups_default_to_none():
    """No initial and no final warm-up unless asked: the cubic schedule runs from step 1 to the last step."""
    pruner = CompressionPruner(compressed_model(), keep_ratio=0.5, total_steps=4)
    assert [pruner.kept_fraction(s) for s in (1, 2, 3, 4)] == pytest.approx(
        [0.5 + 0.5 * (1 - s / 4) ** 3 for s in (1, 2, 3, 4)])
    assert pruner.kept_fraction(1) < 1.0 and pruner.kept_fraction(3) > 0.5


# --- the scores ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ema_is_beta_weighted_and_kept_in_float32(dtype):
    """After two steps the saved EMA is beta (1 - beta) |theta g_1| + (1 - beta) |theta g_2|, in float32
    whatever the model's dtype (a bf16 EMA would round every update to 8 bits)."""
    model = compressed_model(dtype)
    pruner = CompressionPruner(model, keep_ratio=0.5, total_steps=2, initial_warmup=2, final_warmup=0, beta=BETA)
    theta = random_like_rows(model, 0)
    products = []
    for seed in (1, 2):
        grads = random_like_rows(model, seed)
        set_theta_and_grads(model, theta, grads)
        products.append([(t.to(dtype) * g.to(dtype)).abs().double() for t, g in zip(theta, grads)])
        pruner.step()
    for i, ema in enumerate(pruner.state_dict()["ema"]):
        assert ema.dtype == torch.float32
        want = BETA * (1 - BETA) * products[0][i] + (1 - BETA) * products[1][i]
        torch.testing.assert_close(ema.double(), want, rtol=1e-6, atol=1e-7)


def test_every_skipped_score_update_is_counted():
    model = compressed_model()
    pruner = CompressionPruner(model, keep_ratio=0.5, total_steps=5, initial_warmup=5, final_warmup=0, beta=BETA)
    theta = random_like_rows(model, 0)
    for n in range(1, 4):
        grads = random_like_rows(model, n)
        grads[n % 2][0, 0] = float("inf") if n % 2 else float("nan")
        set_theta_and_grads(model, theta, grads)
        pruner.step()
        assert pruner.skipped == n
    assert all(not ema.any() for ema in pruner.state_dict()["ema"])


def test_matrices_without_gradients_keep_their_scores():
    """A matrix whose S rows got no gradient (grad None: not reached by the backward) keeps its EMA; the
    others are updated."""
    model = compressed_model()
    pruner = CompressionPruner(model, keep_ratio=0.5, total_steps=2, initial_warmup=0, final_warmup=0, beta=BETA)
    theta, grads = random_like_rows(model, 0), random_like_rows(model, 1)
    set_theta_and_grads(model, theta, [grads[0], None])
    pruner.step()
    ema = pruner.state_dict()["ema"]
    torch.testing.assert_close(ema[0], (1 - BETA) * (theta[0] * grads[0]).abs())
    assert not ema[1].any() and pruner.skipped == 0


def test_rows_of_zero_width_score_zero_and_go_first():
    """Rows with no entries (a zero-width matrix: w_out of a model with intermediate_size 0) score 0, not
    NaN: as soon as anything is pruned they are dropped before every row with a positive score."""
    wide, empty = compressed_model(), compressed_model(intermediate_size=0)
    both = nn.ModuleList([wide, empty])
    zero_width = matrices(empty)[1]
    assert zero_width[0].shape[0] > 0 and zero_width[0].shape[1] == 0
    pruner = CompressionPruner(both, keep_ratio=0.9, total_steps=1, initial_warmup=0, final_warmup=0, beta=BETA)
    theta, grads = random_like_rows(both, 0), random_like_rows(both, 1)
    theta = [t.abs() + 0.1 for t in theta]
    grads = [g.abs() + 0.1 for g in grads]  # every row with entries scores > 0
    set_theta_and_grads(both, theta, grads)
    assert pruner.step() == 0.9
    assert not zero_width[1]().any(), "rows without entries are kept ahead of scored rows"
    kept_wide = sum(int(keep().sum()) * rows.shape[1] for rows, keep in matrices(wide))
    entries = sum(rows.numel() for rows, _ in matrices(wide))
    assert kept_wide <= 0.9 * entries and kept_wide > 0.9 * entries - max(r.shape[1] for r, _ in matrices(wide))
