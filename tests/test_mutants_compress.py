"""compress.py behaviours that no other test checked, each seen unnoticed under a one-line mutation
(benchmarks/MUTATION.md): lowrank_factors' default and edge ranks and half precision, full_bank on the
weights' device, global_keep's exact entry counts, tie order and empty budgets, float32 row scores, and
every message of the activation-statistics checks. Expected values are computed here independently, on
tiny tensors and models."""
import dataclasses
import re

import pytest
import torch

from mcsmoe_fast import collect_routing_stats, compress_experts, moe_layers
from mcsmoe_fast.compress import full_bank, global_keep, lowrank_factors, row_scores
from mcsmoe_fast.modules.compressed import CompressedMoEExperts
from mcsmoe_fast.tiny import tiny_mixtral, tiny_moe

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def tiny():
    return tiny_mixtral(num_experts=4, hidden_size=16, intermediate_size=24, num_layers=2)


def batches(model, n=2):
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(3, model.config.vocab_size, (2, 8), generator=g)} for _ in range(n)]


def exact(message):
    return "^" + re.escape(message) + "$"


# --- lowrank_factors ------------------------------------------------------------------------------------
def test_the_default_svd_is_auto():
    """Without `svd`, lowrank_factors takes "auto": randomized here (4 r <= min(out, in)), seeded."""
    W = torch.randn(2, 40, 32, generator=torch.Generator().manual_seed(0))
    U, V = lowrank_factors(W, 4)
    Ua, Va = lowrank_factors(W, 4, "auto")
    Ur, Vr = lowrank_factors(W, 4, "randomized")
    assert torch.equal(U, Ua) and torch.equal(V, Va) and torch.equal(U, Ur) and torch.equal(V, Vr)


@pytest.mark.parametrize("shape, rank, method", [
    ((2, 12, 10), 5, "exact"),  # 4 r > min(out, in): exact
    ((2, 16, 20), 4, "randomized"),  # 4 r == min(out, in): randomized
    ((2, 20, 16), 4, "randomized"),
    ((2, 16, 20), 5, "exact"),
])
def test_auto_is_randomized_when_four_times_the_rank_fits(shape, rank, method):
    W = torch.randn(*shape, generator=torch.Generator().manual_seed(5))
    U, V = lowrank_factors(W, rank, "auto")
    Um, Vm = lowrank_factors(W, rank, method)
    assert torch.equal(U, Um) and torch.equal(V, Vm)


@pytest.mark.parametrize("shape, rank", [((2, 30, 40), 3), ((2, 8, 40), 2), ((2, 40, 8), 2), ((1, 6, 5), 9)])
def test_randomized_is_svd_lowrank_with_ten_extra_columns_four_iterations_seed_zero(shape, rank):
    """The documented sketch: torch.svd_lowrank(W, q=min(r + 10, out, in), niter=4) under seed 0, and
    U = U_r sqrt(s_r), V = sqrt(s_r) V_r^T; the caller's random state is left as it was."""
    W = torch.randn(*shape, generator=torch.Generator().manual_seed(6))
    r = min(rank, *shape[1:])
    with torch.random.fork_rng():
        torch.manual_seed(0)
        u, s, v = torch.svd_lowrank(W, q=min(r + 10, *shape[1:]), niter=4)
    want_U = u[..., :r] * s[..., None, :r].sqrt()
    want_V = s[..., :r, None].sqrt() * v[..., :r].mT
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    U, V = lowrank_factors(W, rank, "randomized")
    assert torch.equal(torch.random.get_rng_state(), before)
    assert torch.equal(U, want_U) and torch.equal(V, want_V)


def test_exact_uses_the_thin_svd(monkeypatch):
    """full_matrices=False: a full U of a 14336-row expert matrix would be 14336 x 14336 per slot."""
    calls = []
    real = torch.linalg.svd

    def spy(A, *args, **kwargs):
        calls.append((args, kwargs))
        return real(A, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", spy)
    lowrank_factors(torch.randn(2, 9, 7), 3, "exact")
    assert calls == [((), {"full_matrices": False})]


def test_an_unknown_svd_names_the_choices():
    with pytest.raises(ValueError, match=exact("svd must be one of auto, exact, randomized, got 'qr'")):
        lowrank_factors(torch.randn(4, 3), 1, "qr")


@pytest.mark.parametrize("svd", ["exact", "randomized"])
def test_rank_one_is_the_best_rank_one_approximation(svd):
    W = torch.randn(3, 12, 10, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    U, V = lowrank_factors(W, 1, svd)
    assert U.shape == (3, 12, 1) and V.shape == (3, 1, 10)
    u, s, vh = torch.linalg.svd(W, full_matrices=False)
    best = s[:, :1, None] * u[:, :, :1] @ vh[:, :1, :]
    torch.testing.assert_close(U @ V, best, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("svd", ["exact", "randomized", "auto"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rank_zero_gives_empty_factors_of_the_right_shape(svd, dtype):
    W = torch.randn(3, 5, 4).to(dtype)
    U, V = lowrank_factors(W, 0, svd)
    assert U.shape == (3, 5, 0) and V.shape == (3, 0, 4)
    assert U.dtype == V.dtype == dtype
    U, V = lowrank_factors(W[0], 0, svd)
    assert U.shape == (5, 0) and V.shape == (0, 4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_is_decomposed_in_float32(dtype):
    """CPU SVD has no half-precision kernels: the factors are those of the float32 matrix, cast back."""
    W = torch.randn(2, 16, 12, generator=torch.Generator().manual_seed(2)).to(dtype)
    U, V = lowrank_factors(W, 3, "exact")
    U32, V32 = lowrank_factors(W.float(), 3, "exact")
    assert U.dtype == V.dtype == dtype
    assert torch.equal(U, U32.to(dtype)) and torch.equal(V, V32.to(dtype))


# --- full_bank --------------------------------------------------------------------------------------------
def test_full_bank_stores_every_row_of_the_residual():
    W = torch.randn(3, 6, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    U, V, residual, row_idx, offsets = full_bank(W, 2, "exact")
    torch.testing.assert_close(residual, (W - U @ V).reshape(18, 5))
    assert row_idx.tolist() == list(range(6)) * 3 and offsets.tolist() == [0, 6, 12, 18]


@pytest.mark.parametrize("svd", ["exact", "randomized"])
def test_full_bank_stays_on_the_weights_device(svd):
    """Row indices and offsets are made on the weights' device (meta here: no data, any device works)."""
    bank = full_bank(torch.empty(2, 8, 6, device="meta"), 2, svd)
    assert [t.device.type for t in bank] == ["meta"] * 5


# --- global_keep ------------------------------------------------------------------------------------------
def test_entry_counts_are_exact_beyond_float32():
    """Rows of 2^24 + 1 and 1 entries: float32 cannot count them (2^24 + 1 rounds to 2^24). With a budget of
    exactly (L + 1) of L + 2 entries, the long row and the first short one are kept, the other not."""
    L = 2 ** 24
    keep_a, keep_b = global_keep([torch.tensor([3.0]), torch.tensor([2.0, 1.0])], [L, 1], (L + 1) / (L + 2))
    assert keep_a.tolist() == [True] and keep_b.tolist() == [True, False]


def test_ties_are_broken_by_storage_order():
    """Equal scores: the rows stored first are kept first (a stable sort), so the same model always keeps
    the same rows."""
    keep_a, keep_b = global_keep([torch.zeros(3000), torch.zeros(2000)], [1, 1], 0.5)
    assert keep_a[:2500].all() and not keep_a[2500:].any() and not keep_b.any()


def test_rows_without_entries_fit_an_empty_budget():
    """Nothing to count (every row of zero width): every row fits the budget of 0 entries and is kept."""
    assert global_keep([torch.zeros(3)], [0], 0.5)[0].tolist() == [True] * 3


def test_row_scores_of_rows_without_entries_are_zeros():
    """A zero-width matrix (w_out of a model with intermediate_size 0) has rows without entries: each scores
    0 (not the NaN of an empty mean), one score per row."""
    model = tiny_mixtral(num_experts=4, hidden_size=16, intermediate_size=0, num_layers=1)
    module = next(iter(compress_experts(model, rank=2, importance="gradient", svd="exact", progress=False).values()))
    assert module.out_S_rows.shape == (4 * 16, 0)
    assert torch.equal(row_scores(module, "out", None), torch.zeros(64))
    assert torch.equal(row_scores(module, "out", torch.ones(4, 0, dtype=torch.float64)), torch.zeros(64))


# --- row scores -------------------------------------------------------------------------------------------
def test_activation_row_scores_are_float32_whatever_the_norms_dtype():
    """The calibration sums are float64; the scores are float32 (as the weight scores and the pruner's),
    mean_j |S_ij| * norm[slot(i), j] with slot(i) read from the row offsets."""
    model = tiny()
    module = next(iter(compress_experts(model, rank=2, importance="gradient", svd="exact", progress=False).values()))
    for side in ("in", "out"):
        S_rows, offsets = getattr(module, f"{side}_S_rows").detach(), getattr(module, f"{side}_row_offsets")
        norms = torch.rand(module.num_slots, S_rows.shape[1], generator=torch.Generator().manual_seed(4),
                           dtype=torch.float64)
        scores = row_scores(module, side, norms)
        assert scores.dtype == torch.float32
        want = torch.cat([(S_rows[offsets[s]:offsets[s + 1]].double().abs() * norms[s]).mean(-1)
                          for s in range(module.num_slots)])
        torch.testing.assert_close(scores.double(), want, rtol=1e-5, atol=1e-8)


# --- the activation statistics' checks --------------------------------------------------------------------
@pytest.fixture
def model_and_stats():
    model = tiny()
    return model, collect_routing_stats(model, batches(model), progress=False, input_norms=True)


def test_statistics_without_a_layer_name_it(model_and_stats):
    model, stats = model_and_stats
    name = moe_layers(model)[1].name
    del stats[name]
    with pytest.raises(ValueError, match=exact(
            f"importance='activation' needs routing statistics of layer {name!r}: "
            "stats=collect_routing_stats(model, batches, input_norms=True) on this model")):
        compress_experts(model, rank=2, importance="activation", stats=stats, progress=False)


@pytest.mark.parametrize("missing", ["slot_input_sq", "slot_hidden_sq"])
def test_statistics_without_either_norm_name_the_layer(model_and_stats, missing):
    model, stats = model_and_stats
    name = moe_layers(model)[0].name
    stats[name] = dataclasses.replace(stats[name], **{missing: None})
    with pytest.raises(ValueError, match=exact(f"stats[{name!r}] has no input norms: collect them with input_norms=True")):
        compress_experts(model, rank=2, importance="activation", stats=stats, progress=False)


def test_statistics_of_another_slot_count_say_both_counts(model_and_stats):
    model, stats = model_and_stats
    name = moe_layers(model)[0].name
    s = stats[name]
    stats[name] = dataclasses.replace(s, slot_input_sq=s.slot_input_sq[:3], slot_hidden_sq=s.slot_hidden_sq[:3])
    with pytest.raises(ValueError, match=exact(
            f"stats[{name!r}] describe 3 slots, the layer has 4: collect the statistics on the model being "
            "compressed (after merging)")):
        compress_experts(model, rank=2, importance="activation", stats=stats, progress=False)
    assert not any(isinstance(m, CompressedMoEExperts) for m in model.modules())


# --- compress_experts -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, message", [
    (dict(importance="fisher"), "importance must be one of weight, activation, gradient, got 'fisher'"),
    (dict(svd="qr"), "svd must be one of auto, exact, randomized, got 'qr'"),
    (dict(importance="activation"),
     "importance='activation' needs stats=collect_routing_stats(model, batches, input_norms=True)"),
])
def test_bad_arguments_name_the_choices(kwargs, message):
    with pytest.raises(ValueError, match=exact(message)):
        compress_experts(tiny(), progress=False, **kwargs)


def test_rank_one_is_allowed():
    modules = compress_experts(tiny(), rank=1, keep_ratio=0.5, svd="exact", progress=False)
    assert all(m.in_U.shape[-1] == 1 and m.out_U.shape[-1] == 1 for m in modules.values())


def test_the_settings_and_layers_are_recorded_on_the_config_with_rank_32_by_default():
    model = tiny()
    names = [layer.name for layer in moe_layers(model)]
    compress_experts(model, keep_ratio=0.5, svd="exact", progress=False)
    assert model.config.mcsmoe_compress == {
        "method": {"rank": 32, "keep_ratio": 0.5, "importance": "weight", "svd": "exact"}, "layers": sorted(names)}
    model = tiny()
    compress_experts(model, rank=3, keep_ratio=0.25, importance="gradient", svd="randomized", layers=[1],
                     progress=False)
    assert model.config.mcsmoe_compress == {
        "method": {"rank": 3, "keep_ratio": 0.25, "importance": "gradient", "svd": "randomized"}, "layers": [names[1]]}


def test_transformers_save_is_refused_after_compression(tmp_path):
    """A compressed model's experts are ours: transformers' save_pretrained would write a checkpoint that
    its from_pretrained loads with fresh experts, so it raises and names the way to save."""
    from mcsmoe_fast.checkpoint.plain_save import PlainSaveRefused

    model = tiny()
    compress_experts(model, rank=2, svd="exact", progress=False)
    with pytest.raises(PlainSaveRefused, match="mcsmoe_fast.save_pretrained"):
        model.save_pretrained(tmp_path / "plain")
    assert not (tmp_path / "plain").exists()


def test_a_progress_bar_by_default_and_none_when_asked(capsys):
    compress_experts(tiny(), rank=2, svd="exact")
    err = capsys.readouterr().err
    assert re.search(r"(^|\r)compressing experts: .*2/2.*layer/s", err), err
    compress_experts(tiny(), rank=2, svd="exact", progress=False)
    assert capsys.readouterr().err == ""


def test_expert_biases_and_clamped_swiglu_survive_compression():
    """GPT-OSS experts have biases and a clamped SwiGLU with its own alpha and limit: at full rank, keeping
    every row, the compressed model computes what the model did."""
    model = tiny_moe("gpt_oss", num_experts=4, hidden_size=16, intermediate_size=24, num_layers=2)
    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    modules = compress_experts(model, rank=10_000, keep_ratio=1.0, svd="exact", progress=False)
    assert all(m.b_in is not None and m.b_out is not None and m.activation_args for m in modules.values())
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=0, atol=1e-4)


# --- on a GPU (skipped here): results on the module's device, the caller's CUDA random state untouched ----
@CUDA
def test_randomized_factors_on_cuda_leave_the_cuda_random_state_alone():
    torch.cuda.manual_seed(123)
    before = torch.cuda.get_rng_state()
    U, V = lowrank_factors(torch.randn(2, 40, 32, device="cuda"), 4, "randomized")
    assert U.device.type == "cuda" and torch.equal(torch.cuda.get_rng_state(), before)


@CUDA
def test_row_scores_and_masks_on_cuda_from_cpu_statistics():
    module = next(iter(compress_experts(tiny(), rank=2, importance="gradient", svd="exact", progress=False).values()))
    norms = torch.rand(module.num_slots, module.in_S_rows.shape[1], dtype=torch.float64)
    want = row_scores(module, "in", norms)
    module.cuda()
    scores = row_scores(module, "in", norms)
    assert scores.device.type == "cuda"
    torch.testing.assert_close(scores.cpu(), want)
    masks = global_keep([scores], [module.in_S_rows.shape[1]], 0.5)
    assert masks[0].device.type == "cuda"
