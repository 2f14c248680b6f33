"""The forward's "balanced" thread schedule (csrc/ops/slot_parallel.h): every thread about the same number of
rows, a slot's rows cut between threads where that evens them out, never a piece under kMinPiece (32) rows.
Seen through the GEMMs the calling thread runs (the profiler records the calling thread's ops): their row
counts are the pieces it was given."""
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from mcsmoe_fast import ops, reference
from test_autotune import ffn_backward_matches
from test_grouped_ffn import TOL, biases, problem

D, FF = 64, 48


@pytest.fixture(autouse=True)
def two_threads(monkeypatch):
    monkeypatch.setenv("MCSMOE_AUTOTUNE", "0")  # every other decision at its default
    monkeypatch.setenv("MCSMOE_GEMM", "aten")  # one GEMM op to look for: aten::mm / aten::addmm
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def routed(rows_per_slot, activation="swiglu", seed=0):
    """A problem whose slot s receives exactly rows_per_slot[s] tokens (top-1, expert s is slot s)."""
    S = len(rows_per_slot)
    args = list(problem(sum(rows_per_slot), D, FF, S, S, 1, activation, seed=seed, emap=torch.arange(S)))
    args[4] = torch.repeat_interleave(torch.arange(S), torch.tensor(rows_per_slot)).unsqueeze(1)
    args[4] = args[4][torch.randperm(len(args[4]), generator=torch.Generator().manual_seed(seed))]
    return args


def calling_thread_pieces(args, kw, schedule, monkeypatch):
    """Row counts of the first GEMM of each piece the calling thread ran (the [rows, d] x [d, F] product), and
    the output, checked against the reference."""
    monkeypatch.setenv("MCSMOE_SLOT_PARALLEL", schedule)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        out = ops.grouped_expert_ffn(*args, **kw)
    torch.testing.assert_close(out, reference.grouped_expert_ffn(*args, **kw), **TOL[torch.float32])
    F = args[1].shape[1]
    shapes = [e.input_shapes for e in prof.events() if e.name in ("aten::mm", "aten::addmm")]
    return sorted(s[s.index([D, F]) - 1][0] for s in shapes if [D, F] in s)  # [rows, d] x [d, F]


def test_a_single_slot_is_cut_in_halves(monkeypatch):
    args = routed([300])
    assert calling_thread_pieces(args, {}, "balanced", monkeypatch) == [150]
    assert calling_thread_pieces(args, {}, "sequential", monkeypatch) == [300]  # the anchor: the whole slot


def test_uneven_slots_are_evened_out(monkeypatch):
    """Slots of 200, 60 and 40 rows: 150 rows a thread. The calling thread takes the first 150 rows of the
    largest slot; in parallel, whole slots only (which ones depends on which thread comes first)."""
    args = routed([200, 60, 40], seed=1)
    kw = biases(args)
    assert calling_thread_pieces(args, kw, "balanced", monkeypatch) == [150]
    assert set(calling_thread_pieces(args, kw, "parallel", monkeypatch)) <= {200, 60, 40}


def test_no_piece_under_32_rows(monkeypatch):
    """Slots of 140 and 160 rows: the even cut (150) would leave a 10-row piece, so the cut moves to the slot
    boundary and each thread runs one whole slot; at 100 and 200 the cut stays (50 rows either side)."""
    assert calling_thread_pieces(routed([140, 160], seed=2), {}, "balanced", monkeypatch) == [140]
    assert calling_thread_pieces(routed([100, 200], seed=3), {}, "balanced", monkeypatch) == [50, 100]


@pytest.mark.parametrize("activation", ["swiglu", "clamped_swiglu", "relu"])
def test_pieces_of_every_slot_equal_the_reference(activation, monkeypatch):
    """Random routing with dropped slots, row blocks over 1024 rows, the keep-H forward and its backward."""
    monkeypatch.setenv("MCSMOE_SLOT_PARALLEL", "balanced")
    for T in (1, 33, 301, 1300):
        args = problem(T, D, FF, 8, 3, 2, activation, drop=0.1, seed=T)
        kw = biases(args)
        torch.testing.assert_close(ops.grouped_expert_ffn(*args, **kw), reference.grouped_expert_ffn(*args, **kw),
                                   **TOL[torch.float32])
    ffn_backward_matches(args, kw, dict(rtol=1e-4, atol=1e-4))
