"""The field's methods and their comparison where they went silently wrong (session 31's audit; each test failed
before its fix): perplexity with the router's load-balancing loss switched on, infeasible comparisons refused before
any row, masked layers, NaN saliency, never-routed REAM centroids."""
import math

import pytest
import torch
import torch.nn.functional as F

import mcsmoe_fast as mf
import mcsmoe_fast.compare as compare
from mcsmoe_fast.drop import install_logit_mask
from mcsmoe_fast.grouping import ream_scores
from mcsmoe_fast.models import moe_layers
from mcsmoe_fast.prune import kept_experts, prune_experts
from mcsmoe_fast.ream import ream_experts
from mcsmoe_fast.tiny import tiny_mixtral, tiny_moe
from mcsmoe_fast.train.text import perplexity

GEN = torch.Generator().manual_seed(0)
BATCHES = [{"input_ids": torch.randint(3, 128, (4, 16), generator=GEN)}]
WINDOWS = torch.randint(3, 128, (4, 16), generator=GEN)


def test_perplexity_is_the_cross_entropy_alone_when_the_config_asks_for_router_logits():
    model = tiny_mixtral(num_layers=2, seed=0)
    model.config.output_router_logits = True  # as checkpoints trained with the aux loss ship it
    model.config.router_aux_loss_coef = 0.02
    with torch.no_grad():
        assert model(input_ids=WINDOWS, labels=WINDOWS).aux_loss > 0  # what .loss would include
        logits = model(input_ids=WINDOWS, output_router_logits=False).logits.double()
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), WINDOWS[:, 1:].reshape(-1))
    assert perplexity(model, WINDOWS) == pytest.approx(math.exp(ce.item()), rel=1e-5)


@pytest.mark.parametrize("family,ratios,methods,match", [
    ("mixtral", [0.25, 0.9], ["m-smoe", "reap"], "fewer than the top_k=2"),
    ("mixtral", [0.95], ["m-smoe"], "removes all 8 experts"),
    # REAM merges within routing groups there (compare.py); 2 experts kept leave 1 per routing group
    ("deepseek_v3", [0.75], ["m-smoe", "ream"], r"group-limited routing \(n_group=2\) keeps the same number"),
])
def test_compare_refuses_what_cannot_run_before_any_work(family, ratios, methods, match, monkeypatch):
    model = tiny_mixtral(num_layers=1) if family == "mixtral" else tiny_moe(family, num_layers=1)
    work = []
    monkeypatch.setattr(compare, "collect_routing_stats", lambda *a, **k: work.append("stats"))
    with pytest.raises(ValueError, match=match):
        compare.compare_methods(model, BATCHES, WINDOWS, methods, ratios, progress=False)
    assert work == []


def test_a_layer_with_a_router_mask_is_not_pruned():
    model = tiny_mixtral(num_layers=1)
    install_logit_mask(moe_layers(model)[0], torch.tensor([False] * 3 + [True] * 5))
    stats = mf.collect_routing_stats(model, BATCHES, saliency="reap", progress=False)
    with pytest.raises(ValueError, match="has a router logit mask"):
        prune_experts(model, stats, num_experts=6)


def test_a_nan_saliency_is_refused_by_layer_and_expert():
    model = tiny_mixtral(num_layers=1)
    with torch.no_grad():
        model.model.layers[0].mlp.experts.down_proj[6, 0, 0] = float("nan")
    stats = mf.collect_routing_stats(model, BATCHES, bases=("expert-output",), saliency="reap", progress=False)
    assert torch.isnan(stats["model.layers.0.mlp"].saliency[6])
    with pytest.raises(ValueError, match=r"layer 'model.layers.0.mlp': the REAP saliency of experts \[6\] is NaN"):
        kept_experts(model, stats, num_experts=4)
    with pytest.raises(ValueError, match=r"experts \[6\] is NaN"):
        ream_experts(model, stats, num_experts=4, permute=False, progress=False)


def test_ream_centroids_are_the_routed_experts_before_any_never_routed_one():
    model = tiny_mixtral(num_layers=1)
    stats = mf.collect_routing_stats(model, BATCHES, bases=("expert-output",), saliency="reap", progress=False)
    layer = stats["model.layers.0.mlp"]
    never = [0, 2, 5]  # a calibration set that never reached these experts
    layer.counts[never] = 0
    layer.saliency_sum[never] = 0
    routed = [e for e in range(8) if layer.saliency[e] > 0]
    grouping = ream_experts(model, stats, num_experts=len(routed), permute=False, progress=False)
    assert sorted(grouping["model.layers.0.mlp"].dominant) == routed
    scores = ream_scores(torch.tensor([0.0, 2.0, 0.5, 0.0]))
    assert scores[1] == 2 and scores[2] == 0.5 and 0 < scores[0] == scores[3] < 0.5
    assert scores[0] == pytest.approx(0.5, rel=1e-12)  # weighed as the least salient when merged


def failing_on_the_third_call():
    """A perplexity that gives 7.0 twice, then fails (out of memory in the third row of a comparison)."""
    calls = []

    def perplexity(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("out of memory in the third row")
        return 7.0

    return perplexity


def test_compare_command_keeps_the_finished_rows_when_a_later_one_fails(tmp_path, monkeypatch):
    """results.json and results.md are written after every row: a failure in the third row (hours into a real
    comparison) leaves the full model's row and the first method's on disk."""
    import json

    from mcsmoe_fast.cli import main
    from test_compare import saved_model_and_texts

    saved_model_and_texts(tmp_path)
    monkeypatch.setattr(compare, "perplexity", failing_on_the_third_call())
    args = ["compare", "--model", tmp_path / "mixtral", "--calib", tmp_path / "calib.txt", "--eval-text",
            tmp_path / "eval.txt", "--eval-length", 16, "--ratios", "0.5", "--methods", "reap,frequency",
            "--out", tmp_path / "out"]
    with pytest.raises(RuntimeError, match="third row"):
        main([str(a) for a in args])
    rows = json.loads((tmp_path / "out" / "results.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["full", "reap"] and rows[1]["perplexity"] == 7.0
    assert (tmp_path / "out" / "results.md").read_text().count("\n") == 2 + len(rows)
