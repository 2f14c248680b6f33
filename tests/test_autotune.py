"""Choices by measurement (csrc/ops/autotune.h): every candidate of every decision, forced by its environment
variable, gives the reference's answer (fp32, fp64 and bf16, forward and backward), so each stays correct on
any CPU whichever one the timing picks; the cache fills, settles, pins and resets as documented. No timings
are asserted (which candidate wins depends on the machine)."""
import pytest
import torch

from mcsmoe_fast import ops, reference
from test_grouped_ffn import TOL as FFN_TOL
from test_grouped_ffn import biases, problem
from test_slr import check_ffn, check_linear, ffn_problem, linear_problem

DECISIONS = ops.autotune_decisions()
# bf16 against the float64 reference on the same (rounded) inputs: one bf16 rounding of every GEMM output and
# activation, accumulation in fp32 (docs/performance.md)
BF16 = dict(rtol=5e-2, atol=5e-2)


def close_bf16(got, want, rel=2e-2):
    """bf16 sums (gradients over hundreds of rows): the error relative to the whole tensor's size, not per
    entry (a sum of n bf16-rounded products is off by about sqrt(n) roundings of its typical term):
    ||got - want|| <= rel ||want|| and no entry off by more than 10 rel max|want|."""
    got, want = got.double(), want.double()
    scale = want.norm().item()
    assert (got - want).norm().item() <= rel * scale + 1e-6, f"relative error {(got - want).norm().item() / scale:.3g}"
    assert (got - want).abs().max().item() <= 10 * rel * want.abs().max().item() + 1e-6


@pytest.fixture(autouse=True)
def fresh_cache(monkeypatch):
    for var in ["MCSMOE_AUTOTUNE", "MCSMOE_AUTOTUNE_REPS"] + [env for env, _ in DECISIONS.values()]:
        monkeypatch.delenv(var, raising=False)
    ops.autotune_reset()
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # both thread schedules differ only with two threads or more
    yield
    torch.set_num_threads(threads)
    ops.autotune_reset()


def test_the_decisions_and_their_pins():
    assert DECISIONS == {
        "slot_parallel": ("MCSMOE_SLOT_PARALLEL", ["sequential", "parallel", "balanced"]),
        "slr_row_parallel": ("MCSMOE_SLR_ROW_PARALLEL", ["one_block", "row_blocks"]),
        "slr_path": ("MCSMOE_SLR_PATH", ["two_gemms", "stacked"]),
        "gemm": ("MCSMOE_GEMM", ["aten", "onednn", "fp32"]),
    }


CANDIDATES = [(name, label) for name, (_, labels) in DECISIONS.items() for label in labels]
DTYPES = [torch.float32, torch.float64, torch.bfloat16]


def ffn_backward_matches(args, kw, tol):
    """ops.grouped_expert_ffn's gradients (the fused backward) against the float64 reference's."""
    wide = [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    kw64 = {k: v.double() for k, v in kw.items()}
    grads = []
    for fn, a, b in ((ops.grouped_expert_ffn, args, kw), (reference.grouped_expert_ffn, wide, kw64)):
        leaves = [t.detach().clone().requires_grad_() for t in (a[0], a[1], a[2], a[5], *b.values())]
        out = fn(*leaves[:3], a[3], a[4], leaves[3], a[6], **dict(zip(b, leaves[4:])))
        probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
        (out * probe.to(out.dtype)).sum().backward()
        grads.append([t.grad for t in leaves])
    for got, want in zip(*grads):
        assert got.dtype == args[0].dtype or got.dtype == args[5].dtype
        if args[0].dtype == torch.bfloat16:
            close_bf16(got, want)
        else:
            torch.testing.assert_close(got.double(), want, **tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("decision,label", CANDIDATES)
def test_every_candidate_matches_the_reference(decision, label, dtype, monkeypatch):
    """Each candidate pinned in turn: the grouped FFN forward and fused backward, the compressed linear (and
    its autograd backward) and the compressed grouped FFN, with shapes large enough to reach the decision
    (two busy slots and more, GEMMs above the timing threshold, row blocks of 64 rows a thread)."""
    monkeypatch.setenv("MCSMOE_AUTOTUNE", "0")  # the other decisions at their defaults: this candidate alone varies
    monkeypatch.setenv(DECISIONS[decision][0], label)
    tol = BF16 if dtype == torch.bfloat16 else FFN_TOL[dtype] if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    for T in (3, 300):
        args = problem(T, 64, 96, 8, 4, 2, "swiglu", dtype, 0.1, seed=T)
        kw = biases(args)
        out = ops.grouped_expert_ffn(*args, **kw)
        wide = [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
        ref = reference.grouped_expert_ffn(*wide, **{k: v.double() for k, v in kw.items()})
        assert out.dtype == dtype
        torch.testing.assert_close(out.double(), ref, **tol)
        ffn_backward_matches(args, kw, tol)
    for T in (5, 300):
        for inn, out in ((96, 160), (160, 96)):
            check_linear(linear_problem((T,), inn, out, 8, 20, True, dtype, seed=T), **tol)
            x, U, V, S_rows, row_idx, b = (t.requires_grad_() if t is not None and t.is_floating_point() else t
                                           for t in linear_problem((T,), inn, out, 8, 20, True, dtype, seed=T + 1))
            ops.sparse_lowrank_linear(x, U, V, S_rows, row_idx, b).sum().backward()
            leaves = [t.detach().double().requires_grad_() for t in (x, U, V, S_rows, b)]
            reference.sparse_lowrank_linear(*leaves[:4], row_idx, leaves[4]).sum().backward()
            for got, want in zip((x, U, V, S_rows, b), leaves):
                if dtype == torch.bfloat16:
                    close_bf16(got.grad, want.grad)
                else:
                    torch.testing.assert_close(got.grad.double(), want.grad, **tol)
        check_ffn(ffn_problem(T, 48, 80, 8, 4, 2, 8, "swiglu", dtype, 0.1, seed=T), **tol)


def test_bad_pin_names_the_candidates(monkeypatch):
    monkeypatch.setenv("MCSMOE_GEMM", "mkl")
    args = problem(300, 64, 96, 8, 4, 2, "swiglu")
    with pytest.raises(ValueError, match=r"MCSMOE_GEMM=mkl names no candidate of gemm; expected one of 0/aten, 1/onednn"):
        ops.grouped_expert_ffn(*args)


def call_until_settled(fn, limit=400):
    for calls in range(1, limit + 1):
        out = fn()
        if ops.autotune_choices() and all(row["winner"] for row in ops.autotune_choices()):
            return calls, out
    raise AssertionError(f"not settled after {limit} calls: {ops.autotune_choices()}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_choices_are_measured_once_and_kept(dtype, monkeypatch):
    """The first calls of each shape class time every candidate (round robin, warm-up first), the winner is
    the lowest median, later calls run it without timing; each call's answer equals the reference whichever
    candidate ran it."""
    monkeypatch.setenv("MCSMOE_AUTOTUNE_REPS", "2")
    args = problem(300, 64, 96, 8, 4, 2, "swiglu", dtype, seed=1)
    ref = reference.grouped_expert_ffn(*[a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                                         for a in args])
    tol = BF16 if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-4)
    calls, _ = call_until_settled(lambda: torch.testing.assert_close(ops.grouped_expert_ffn(*args).double(), ref, **tol))
    rows = ops.autotune_choices()
    decided = {row["decision"] for row in rows}
    assert {"slot_parallel", "gemm"} <= decided
    slots = [row for row in rows if row["decision"] == "slot_parallel"]
    assert len(slots) == 1 and "grouped_expert_ffn " + str(dtype).split(".")[1].replace("bfloat16", "BFloat16")\
        .replace("float32", "Float") in slots[0]["shape"] and "threads=2" in slots[0]["shape"]
    for row in rows:  # every candidate this CPU can run has its median; the winner has the lowest
        labels = DECISIONS[row["decision"]][1]
        assert set(row["median_ms"]) <= set(labels) and len(row["median_ms"]) >= 2
        assert row["median_ms"][row["winner"]] == min(row["median_ms"].values())
    gemm = [row for row in rows if row["decision"] == "gemm"]
    if dtype == torch.bfloat16:
        assert all("fp32" in row["median_ms"] for row in gemm)  # bf16 may run as an fp32 GEMM
    else:
        assert all("fp32" not in row["median_ms"] for row in gemm)
    before = ops.autotune_choices()
    for _ in range(3):
        torch.testing.assert_close(ops.grouped_expert_ffn(*args).double(), ref, **tol)
    assert ops.autotune_choices() == before  # settled: no more timing, the same winners
    assert calls > 1
    ops.autotune_reset()
    assert ops.autotune_choices() == []


def test_compressed_linear_decisions_are_measured():
    x, U, V, S_rows, row_idx, b = linear_problem((300,), 160, 96, 8, 20, True, seed=2)
    call_until_settled(lambda: ops.sparse_lowrank_linear(x, U, V, S_rows, row_idx, b))
    decided = {row["decision"]: row for row in ops.autotune_choices()}
    assert {"slr_row_parallel", "slr_path", "gemm"} <= set(decided)
    assert "in=160 out=96 r=8" in decided["slr_row_parallel"]["shape"]


def test_timing_off_and_pins_record_nothing(monkeypatch):
    args = problem(300, 64, 96, 8, 4, 2, "swiglu", seed=3)
    monkeypatch.setenv("MCSMOE_AUTOTUNE", "0")
    first = ops.grouped_expert_ffn(*args)
    assert ops.autotune_choices() == []
    assert torch.equal(ops.grouped_expert_ffn(*args), first)  # the fixed defaults: deterministic
    monkeypatch.delenv("MCSMOE_AUTOTUNE")
    for _, (env, labels) in DECISIONS.items():
        monkeypatch.setenv(env, labels[0])
    ops.grouped_expert_ffn(*args)
    assert ops.autotune_choices() == []
    monkeypatch.delenv("MCSMOE_GEMM")  # one decision left free: only it is timed
    ops.grouped_expert_ffn(*args)
    assert {row["decision"] for row in ops.autotune_choices()} == {"gemm"}


def test_deterministic_algorithms_turn_timing_off(monkeypatch):
    """torch.use_deterministic_algorithms(True) times nothing and runs the defaults MCSMOE_AUTOTUNE=0 runs; turned
    off again, the same calls are timed."""
    ffn = problem(300, 64, 96, 8, 4, 2, "swiglu", seed=5)
    x, U, V, S_rows, row_idx, b = linear_problem((300,), 160, 96, 8, 20, True, seed=6)
    calls = lambda: (ops.grouped_expert_ffn(*ffn), ops.sparse_lowrank_linear(x, U, V, S_rows, row_idx, b))  # noqa
    monkeypatch.setenv("MCSMOE_AUTOTUNE", "0")
    defaults = calls()
    monkeypatch.delenv("MCSMOE_AUTOTUNE")
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        for _ in range(3):
            assert all(torch.equal(a, b) for a, b in zip(calls(), defaults))
        assert ops.autotune_choices() == []
    finally:
        torch.use_deterministic_algorithms(before)
    calls()
    assert ops.autotune_choices() != []


def test_one_thread_has_no_schedule_to_choose():
    torch.set_num_threads(1)
    args = problem(300, 64, 96, 8, 4, 2, "swiglu", seed=4)
    ops.grouped_expert_ffn(*args)
    x, U, V, S_rows, row_idx, b = linear_problem((300,), 160, 96, 8, 20, True, seed=2)
    ops.sparse_lowrank_linear(x, U, V, S_rows, row_idx, b)
    decided = {row["decision"] for row in ops.autotune_choices()}
    assert "slot_parallel" not in decided and "slr_row_parallel" not in decided


def test_a_weight_stored_transposed_is_its_own_gemm_class_and_at_mm_is_the_default(monkeypatch):
    """GPT-OSS and Llama-4 store their banks transposed (w [N, K] a view of [K, N]): oneDNN reorders such a
    weight on every call, so it is timed as its own class ("wT"). Without timing every product runs at::mm, a
    contiguous weight too (oneDNN may run only a process's first shapes: test_onednn_shapes.py)."""
    args = problem(300, 64, 96, 8, 4, 2, "swiglu", torch.float32, seed=5)
    stored = [args[1].transpose(1, 2).contiguous().transpose(1, 2), args[2].transpose(1, 2).contiguous().transpose(1, 2)]
    transposed = (args[0], *stored, *args[3:])
    ops.grouped_expert_ffn(*transposed)
    ops.grouped_expert_ffn(*args)
    shapes = [row["shape"] for row in ops.autotune_choices() if row["decision"] == "gemm"]
    assert any(" wT" in s for s in shapes) and any(" wT" not in s for s in shapes), shapes
    monkeypatch.setenv("MCSMOE_AUTOTUNE", "0")
    big = problem(600, 256, 512, 4, 1, 1, "relu", torch.float32, seed=6)  # one slot: 600 x 512 x 256 > 2^21
    big_t = (big[0], big[1].transpose(1, 2).contiguous().transpose(1, 2), big[2].transpose(1, 2).contiguous().transpose(1, 2),
             *big[3:])
    ran = {}
    for name, a in (("contiguous", big), ("transposed", big_t)):
        with torch.profiler.profile() as prof:
            out = ops.grouped_expert_ffn(*a)
        ran[name] = {e.key for e in prof.key_averages()}
        torch.testing.assert_close(out, reference.grouped_expert_ffn(*a), rtol=1e-4, atol=1e-4)
    for name in ran:
        assert "mkldnn::_linear_pointwise" not in ran[name] and "aten::mm" in ran[name], name


@pytest.mark.parametrize("var,value,message", [
    ("MCSMOE_AUTOTUNE", "off", "MCSMOE_AUTOTUNE=off is not 0 or 1"),
    ("MCSMOE_AUTOTUNE", "0 ", "MCSMOE_AUTOTUNE=0  is not 0 or 1"),
    ("MCSMOE_AUTOTUNE_REPS", "abc", "MCSMOE_AUTOTUNE_REPS=abc is not a whole number from 1 to 50"),
    ("MCSMOE_AUTOTUNE_REPS", "1000", "MCSMOE_AUTOTUNE_REPS=1000 is not a whole number from 1 to 50"),
])
def test_a_switch_that_means_nothing_is_refused(var, value, message, monkeypatch):
    """MCSMOE_AUTOTUNE=off used to leave timing on without a word (the user asked for the fixed defaults)."""
    monkeypatch.setenv(var, value)
    args = problem(300, 64, 96, 8, 4, 2, "swiglu", seed=7)
    with pytest.raises(ValueError, match=message):
        ops.grouped_expert_ffn(*args)
    monkeypatch.setenv(var, "1" if var == "MCSMOE_AUTOTUNE" else "2")
    torch.testing.assert_close(ops.grouped_expert_ffn(*args), reference.grouped_expert_ffn(*args), rtol=1e-4, atol=1e-4)
