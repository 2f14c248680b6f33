"""mcsmoe_fast/train behaviours that no other test checked, each seen unnoticed under a one-line mutation
(benchmarks/MUTATION.md). Expected values are computed here independently, on tiny models and tensors."""
import re
import warnings

import pytest
import torch
import torch.nn.functional as F

from mcsmoe_fast.train import kd_divergence, kd_loss, task_loss
from mcsmoe_fast.train.losses import hidden_loss
from mcsmoe_fast.train.text import Windows, perplexity
from train_helpers import tiny_job_model


def exact(message):
    return "^" + re.escape(message) + "$"


class Out:
    def __init__(self, logits, hidden=None):
        self.logits, self.hidden_states = logits, hidden


# --- text.py ----------------------------------------------------------------------------------------------
def test_windows_cut_non_overlapping_rows_down_to_the_smallest_sizes():
    w = Windows(torch.arange(20), 6)
    assert len(w) == 3 and torch.equal(w[2], torch.arange(12, 18))
    assert len(Windows(torch.arange(6), 6)) == 1  # exactly one window of tokens
    assert len(Windows(torch.arange(5), 2)) == 2  # the shortest window: one next-token target
    with pytest.raises(ValueError, match=exact("window length must be >= 2, got 1")):
        Windows(torch.arange(5), 1)
    with pytest.raises(ValueError, match=exact("5 tokens are fewer than one window of 6")):
        Windows(torch.arange(5), 6)


def plain_perplexity(model, windows):
    with torch.no_grad():
        logits = model(input_ids=windows).logits[:, :-1]
        return torch.exp(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))).item()


def test_perplexity_of_two_token_windows():
    model = tiny_job_model()
    windows = torch.randint(0, 40, (5, 2), generator=torch.Generator().manual_seed(0))
    assert perplexity(model, windows, batch_size=2) == pytest.approx(plain_perplexity(model, windows), rel=1e-5)


def test_perplexity_runs_batches_of_32_windows_by_default():
    model = tiny_job_model()
    sizes = []
    model.register_forward_pre_hook(lambda module, args, kwargs: sizes.append(kwargs["input_ids"].shape[0]),
                                    with_kwargs=True)
    windows = torch.randint(0, 40, (40, 4), generator=torch.Generator().manual_seed(1))
    assert perplexity(model, windows) == pytest.approx(plain_perplexity(model, windows), rel=1e-5)
    assert sizes == [32, 8] + [40]  # the last call is plain_perplexity's own


@pytest.mark.parametrize("shape", [(0, 5), (3, 1), (5,), (2, 3, 4)])
def test_perplexity_refuses_windows_it_cannot_score(shape):
    with pytest.raises(ValueError, match=exact(f"perplexity needs windows [N >= 1, L >= 2], got {shape}")):
        perplexity(tiny_job_model(), torch.zeros(shape, dtype=torch.long))


def test_perplexity_of_one_window():
    model = tiny_job_model()
    window = torch.randint(0, 40, (1, 6), generator=torch.Generator().manual_seed(2))
    assert perplexity(model, window) == pytest.approx(plain_perplexity(model, window), rel=1e-5)


# --- losses.py --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("causal", [True, False])
def test_task_loss_is_the_cross_entropy_over_the_target_tokens(causal):
    g = torch.Generator().manual_seed(3)
    B, L, V = 3, 7, 11
    logits, labels = torch.randn(B, L, V, generator=g), torch.randint(0, V, (B, L), generator=g)
    labels[0, 4:] = -100
    labels[2, :2] = -100
    rows, targets = (logits[:, :-1], labels[:, 1:]) if causal else (logits, labels)
    pairs = [(rows[b, t], targets[b, t]) for b in range(B) for t in range(rows.shape[1]) if targets[b, t] != -100]
    want = torch.stack([-F.log_softmax(r.double(), -1)[y] for r, y in pairs]).mean()
    got = task_loss(logits.bfloat16(), labels, causal)
    assert got.dtype == torch.float32  # computed in float32 from half-precision logits
    torch.testing.assert_close(task_loss(logits, labels, causal).double(), want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=1e-3)


def test_kd_divergence_takes_the_softmax_over_the_vocabulary_without_warnings():
    """Rows [N, V]: the tempered distributions are over V. An implicit softmax dimension (deprecated in
    torch) would warn at every step."""
    g = torch.Generator().manual_seed(4)
    s, t = torch.randn(6, 9, generator=g), torch.randn(6, 9, generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = kd_divergence(s, t, 2.0, batch_size=3)
    p, q = F.softmax(t.double() / 2, -1), F.softmax(s.double() / 2, -1)
    torch.testing.assert_close(got.double(), (p * (p.log() - q.log())).sum() / 3, rtol=1e-5, atol=1e-7)


def test_hidden_loss_of_a_decoder_only_model_output():
    """A causal LM's output has no encoder_hidden_states attribute at all: the hidden-state loss of two real
    model outputs is log(MSE) over the states after the embeddings."""
    student, teacher = tiny_job_model(0), tiny_job_model(1)
    ids = torch.randint(0, 40, (2, 6), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out_s, out_t = student(input_ids=ids, output_hidden_states=True), teacher(input_ids=ids, output_hidden_states=True)
    assert not hasattr(out_s, "encoder_hidden_states")
    pairs = list(zip(out_s.hidden_states, out_t.hidden_states))[1:]
    mse = sum(((a.double() - b.double()) ** 2).sum() for a, b in pairs) / sum(a.numel() for a, _ in pairs)
    torch.testing.assert_close(hidden_loss(out_s, out_t).double(), mse.log(), rtol=1e-5, atol=1e-6)


def test_hidden_loss_needs_a_state_after_the_embeddings():
    x = torch.zeros(1, 2, 3)
    with pytest.raises(ValueError, match=exact(
            "the hidden-state loss needs at least one hidden state after the embeddings")):
        hidden_loss(Out(x, hidden=[x]), Out(x, hidden=[x]))


def test_kd_loss_reports_its_parts_by_name():
    g = torch.Generator().manual_seed(6)
    s, t = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g)
    states = [torch.randn(2, 5, 3, generator=g) for _ in range(4)]
    labels = torch.randint(0, 7, (2, 5), generator=g)
    total, parts = kd_loss(Out(s, states[:2]), Out(t, states[2:]), labels, True, 0.5, 2.0, 0.25, 0.125)
    assert sorted(parts) == ["hd", "kd", "task"]
    want = 0.25 * parts["task"] + 0.5 * parts["kd"] + 0.125 * parts["hd"]
    assert total.item() == pytest.approx(want, rel=1e-6)
    assert parts["task"] == pytest.approx(task_loss(s, labels, True).item(), rel=1e-6)
