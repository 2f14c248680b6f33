"""CompressionPruner and the train loop's pruning against hand computations: the EMA (beta 0.85) of
|theta * grad| averaged per row, one global threshold over every matrix, and the cubic schedule with
its initial and final warm-ups as the train loop runs it (the kept share after every step).

The pruner is driven by hand here: the S rows (theta) and their gradients are set directly, so the
expected scores follow from the paper's formulas alone. Every pruner and TrainConfig setting is given
explicitly (defaults may change), except in the one case that checks the default beta is the paper's."""
import pytest
import torch

from mcsmoe_fast import CompressionPruner, compress_experts
from mcsmoe_fast.modules.compressed import CompressedMoEExperts
from mcsmoe_fast.tiny import tiny_mixtral
from mcsmoe_fast.train import TrainConfig, train
from train_helpers import collate, perplexity_on, tiny_job_data, tiny_job_model

BETA = 0.85  # the paper's EMA factor


def compressed_model():
    """A tiny Mixtral (2 layers, 4 experts of d=16, ff=24) compressed for pruning during training."""
    model = tiny_mixtral(num_experts=4, hidden_size=16, intermediate_size=24, num_layers=2)
    compress_experts(model, rank=2, keep_ratio=0.5, importance="gradient", svd="exact", progress=False)
    return model


def matrices(model):
    """Every S_rows parameter (w_in then w_out of each compressed module, module order) and its mask."""
    out = []
    for m in model.modules():
        if isinstance(m, CompressedMoEExperts):
            out += [(m.in_S_rows, lambda m=m: m.in_keep), (m.out_S_rows, lambda m=m: m.out_keep)]
    return out


def total_entries(model):
    return sum(rows.numel() for rows, _ in matrices(model))


@torch.no_grad()
def set_theta_and_grads(model, theta: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
    for (rows, _), t, g in zip(matrices(model), theta, grads):
        rows.copy_(t)
        rows.grad = g.clone()


def zeros_like_rows(model):
    return [torch.zeros_like(rows) for rows, _ in matrices(model)]


def kept(model):
    return [keep().clone() for _, keep in matrices(model)]


# --- the EMA and the importance -------------------------------------------------------------------
@pytest.mark.parametrize("beta", [BETA, None], ids=["beta-0.85", "default-beta"])
@pytest.mark.parametrize("ratio, winner", [(0.845, "first"), (0.855, "second")])
def test_two_step_ema_with_beta_085_decides_which_row_is_kept(ratio, winner, beta):
    """Row A has importance 1 at step 1 only, row B importance `ratio` at step 2 only; the budget is one
    row. After two steps EMA_A = beta (1 - beta) and EMA_B = (1 - beta) ratio: A is kept iff beta > ratio,
    so with beta = 0.85 the kept row flips between ratio 0.845 and 0.855. The default beta, which the
    train loop's pruner uses, is the paper's 0.85 too."""
    model = compressed_model()
    d = matrices(model)[0][0].shape[1]
    pruner = CompressionPruner(model, keep_ratio=d / total_entries(model), total_steps=2, initial_warmup=1,
                               final_warmup=1, **({} if beta is None else {"beta": beta}))
    theta = [torch.ones_like(g) for g in zeros_like_rows(model)]
    grads = zeros_like_rows(model)
    grads[0][0] = 1.0  # row A: w_in of the first module, row 0
    set_theta_and_grads(model, theta, grads)
    assert pruner.step() == 1.0  # the initial warm-up keeps everything
    grads = zeros_like_rows(model)
    grads[0][1] = ratio  # row B: row 1 of the same matrix
    set_theta_and_grads(model, theta, grads)
    assert pruner.step() == pytest.approx(d / total_entries(model))
    masks = kept(model)
    kept_rows = [(i, int(r)) for i, m in enumerate(masks) for r in m.nonzero().flatten()]
    assert kept_rows == ([(0, 0)] if winner == "first" else [(0, 1)]), \
        f"kept {kept_rows}: with beta={BETA}, row A scores {BETA * (1 - BETA):.4f}, row B {(1 - BETA) * ratio:.4f}"


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_importance_is_theta_times_grad_not_the_gradient_alone(sign):
    """Row A: large weights (|theta| = 4), small gradient (0.5): |theta * grad| = 2. Row B: small weights
    (0.5), larger gradient (2): |theta * grad| = 1. The paper keeps A; ranking by |grad| would keep B."""
    model = compressed_model()
    ff = matrices(model)[1][0].shape[1]  # the budget: one row of w_out
    pruner = CompressionPruner(model, keep_ratio=ff / total_entries(model), total_steps=1, initial_warmup=0,
                               final_warmup=0, beta=BETA)
    theta = [torch.ones_like(g) for g in zeros_like_rows(model)]
    grads = zeros_like_rows(model)
    theta[1][3], grads[1][3] = sign * 4.0, 0.5  # row A: w_out of the first module, row 3
    theta[1][5], grads[1][5] = 0.5, sign * 2.0  # row B: row 5 of the same matrix
    set_theta_and_grads(model, theta, grads)
    pruner.step()
    masks = kept(model)
    kept_rows = [(i, int(r)) for i, m in enumerate(masks) for r in m.nonzero().flatten()]
    assert kept_rows == [(1, 3)], f"kept {kept_rows}; |theta*grad|: row 3 = 2, row 5 = 1 (|grad|: 0.5 vs 2)"


def hand_schedule(step, keep_ratio, total, initial, final):
    """The paper's kept fraction after optimizer step `step` (1-based)."""
    if step <= initial:
        return 1.0
    if step > total - final:
        return keep_ratio
    progress = (step - initial) / (total - final - initial)
    return keep_ratio + (1 - keep_ratio) * (1 - progress) ** 3


def test_masks_follow_a_hand_simulation_of_the_ema_and_the_global_threshold():
    """Random theta and gradients over every row for 5 steps; the masks after each step equal a plain
    simulation: EMA_t = beta EMA_{t-1} + (1 - beta) |theta grad_t| per entry, row score = its mean, rows
    masked before stay masked, the highest rows kept while their entries fit the scheduled share."""
    total, initial, final, keep_ratio = 5, 1, 1, 0.3
    model = compressed_model()
    pruner = CompressionPruner(model, keep_ratio=keep_ratio, total_steps=total, initial_warmup=initial,
                               final_warmup=final, beta=BETA)
    g = torch.Generator().manual_seed(0)
    shapes = [rows.shape for rows, _ in matrices(model)]
    theta = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    ema = [torch.zeros(s, dtype=torch.float64) for s in shapes]
    alive = [torch.ones(s[0], dtype=torch.bool) for s in shapes]
    n_entries = sum(s.numel() for s in shapes)
    for step in range(1, total + 1):
        scale = [torch.rand(s[0], 1, generator=g, dtype=torch.float64) for s in shapes]  # rows differ in scale
        grads = [torch.randn(s, generator=g, dtype=torch.float64) * c for s, c in zip(shapes, scale)]
        set_theta_and_grads(model, [t.float() for t in theta], [x.float() for x in grads])
        fraction = pruner.step()
        expected_fraction = hand_schedule(step, keep_ratio, total, initial, final)
        assert fraction == pytest.approx(expected_fraction)
        for e, t, x in zip(ema, theta, grads):
            e.mul_(BETA).add_((1 - BETA) * (t.float().double() * x.float().double()).abs())
        if expected_fraction < 1.0:
            rows = [(float(e[r].mean()), e.shape[1], (i, r)) for i, e in enumerate(ema) for r in range(e.shape[0])
                    if alive[i][r]]
            ranked = sorted(rows, key=lambda row: -row[0])
            used, keep = 0, set()
            for score, n, key in ranked:
                if used + n > expected_fraction * n_entries:
                    break
                used += n
                keep.add(key)
            alive = [torch.tensor([(i, r) in keep for r in range(a.shape[0])]) for i, a in enumerate(alive)]
        for i, (mask, want) in enumerate(zip(kept(model), alive)):
            assert torch.equal(mask.cpu(), want), (f"step {step}, matrix {i}: kept {int(mask.sum())} rows, "
                                                   f"expected {int(want.sum())} ({int((mask != want).sum())} differ)")


# --- the schedule as the train loop runs it -------------------------------------------------------
def train_config(**pruning) -> TrainConfig:
    """Every setting explicit (defaults may change; these tests are about the pruning schedule)."""
    return TrainConfig(steps=12, batch_size=8, learning_rate=5e-3, warmup_steps=2, weight_decay=0.01, adam_eps=1e-6,
                       adam_betas=(0.9, 0.98), max_grad_norm=1.0, train_routers=False, kd_lambda=0.2, temperature=2.0,
                       task_lambda=1.0, hd_lambda=0.0, eval_every=1, metric="perplexity", greater_is_better=False,
                       seed=0, mixed_precision="no", **pruning)


def kept_share(model):
    """(kept share of S's entries, entries of the longest row / all entries) of a model being pruned."""
    modules = [m for m in model.modules() if isinstance(m, CompressedMoEExperts)]
    kept_entries = sum(int(m.in_keep.sum()) * m.in_S_rows.shape[1] + int(m.out_keep.sum()) * m.out_S_rows.shape[1]
                       for m in modules)
    entries = sum(m.in_S_rows.numel() + m.out_S_rows.numel() for m in modules)
    longest = max(max(m.in_S_rows.shape[1], m.out_S_rows.shape[1]) for m in modules)
    return kept_entries / entries, longest / entries


@pytest.mark.parametrize("initial, final", [(0, 3), (2, 3)])
def test_train_prunes_on_the_cubic_schedule_from_its_initial_warm_up(initial, final):
    """The kept share after every step of a 12-step run follows the paper's schedule: with no initial
    warm-up and a final one of 3 steps, [0.78, 0.60, 0.47, 0.38, ...] from step 1, 0.25 from step 9."""
    model, data = tiny_job_model(), tiny_job_data()
    compress_experts(model, rank=4, keep_ratio=0.5, importance="gradient", svd="exact", progress=False)
    config = train_config(keep_ratio=0.25, prune_initial_warmup=initial, prune_final_warmup=final)
    shares = {}
    train(model, data, config, collate_fn=collate, eval_fn=perplexity_on(data), progress=False,
          callback=lambda m, record: shares.__setitem__(record["step"], kept_share(m)))
    assert sorted(shares) == list(range(1, 13))
    expected = [hand_schedule(s, 0.25, 12, initial, final) for s in range(1, 13)]
    if initial == 0:
        assert [round(f, 2) for f in expected[:4]] == [0.78, 0.60, 0.47, 0.38]
    for step, want in zip(range(1, 13), expected):
        share, row = shares[step]
        # the greedy threshold stops before the first row that does not fit: within one row below
        assert want - row < share <= want + 1e-12, \
            f"step {step}: kept share {share:.4f}, scheduled {want:.4f}; all steps: " \
            f"{[round(shares[s][0], 3) for s in sorted(shares)]} vs {[round(f, 3) for f in expected]}"
