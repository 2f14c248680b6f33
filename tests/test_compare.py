"""`mcsmoe-fast compare` (compare.py) on a tiny Mixtral: every method at two ratios from one statistics pass,
results.json and the table; each row's perplexity is that of the method run on its own."""
import json
import math

import pytest
import torch

from mcsmoe_fast import collect_routing_stats
from mcsmoe_fast.cli import main
from mcsmoe_fast.compare import compare_methods
from mcsmoe_fast.models.hub import load_model
from mcsmoe_fast.prune import prune_experts
from mcsmoe_fast.tiny import tiny_mixtral
from mcsmoe_fast.train.text import perplexity
from test_cli_merge import LINES, tiny_tokenizer


def saved_model_and_texts(tmp_path):
    """A tiny Mixtral with its tokenizer in tmp_path/mixtral, calibration and evaluation texts beside it."""
    tiny_mixtral().save_pretrained(tmp_path / "mixtral")
    tiny_tokenizer().save_pretrained(tmp_path / "mixtral")
    (tmp_path / "calib.txt").write_text("\n".join(LINES * 4) + "\n")
    (tmp_path / "eval.txt").write_text(" ".join(LINES * 6))


def test_compare_command(tmp_path, capsys):
    saved_model_and_texts(tmp_path)
    args = ["compare", "--model", tmp_path / "mixtral", "--calib", tmp_path / "calib.txt", "--eval-text",
            tmp_path / "eval.txt", "--eval-length", 16, "--ratios", "0.25,0.5", "--out", tmp_path / "out"]
    assert main([str(a) for a in args]) == 0
    out = capsys.readouterr().out
    assert "| reap | 50% | 4 | 50.0% | standard |" in out and "| m-smoe | 25% | 6 | 75.0% | exact |" in out
    result = json.loads((tmp_path / "out" / "results.json").read_text())
    rows = result["rows"]
    assert [r["method"] for r in rows] == ["full"] + ["m-smoe", "hc-smoe", "reap", "ream", "frequency"] * 2
    assert all(math.isfinite(r["perplexity"]) for r in rows)
    assert (tmp_path / "out" / "results.md").read_text().count("\n") == 2 + len(rows)
    bad = args[:-2] + ["--methods", "reap,drop", "--out", tmp_path / "bad"]
    assert main([str(a) for a in bad]) == 2
    assert "unknown or none ['drop']" in capsys.readouterr().err


def test_rows_are_the_methods_themselves(tmp_path):
    model = tiny_mixtral()
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(3, 128, (3, 12), generator=g)} for _ in range(2)]
    batches = [dict(b, attention_mask=torch.ones_like(b["input_ids"])) for b in batches]
    windows = torch.randint(3, 128, (4, 16), generator=g)
    result = compare_methods(model, batches, windows, ["reap", "frequency"], [0.5], progress=False)
    stats = collect_routing_stats(model, batches, saliency="reap", progress=False)
    for row in result["rows"][1:]:
        pruned = prune_experts(model, stats, ratio=0.5, method=row["method"])
        assert row["perplexity"] == perplexity(pruned, windows)
    assert result["rows"][0]["perplexity"] == perplexity(model, windows)


def kd_setup():
    from mcsmoe_fast.train import TrainConfig
    from mcsmoe_fast.train.text import Windows

    g = torch.Generator().manual_seed(1)
    kd_data = Windows(torch.randint(3, 128, (12 * 16,), generator=g), 16)
    return TrainConfig(steps=3, batch_size=4, learning_rate=2e-2, warmup_steps=0, eval_every=0), kd_data


def test_kd_rows_are_each_method_distilled_from_the_input_model():
    """After-KD perplexity of each row = the method's one-shot model trained by train() with the input model
    as the teacher, the same budget for all; a fine-tuned (no teacher) or self-taught student gives other
    numbers, and the input model comes back unchanged."""
    import copy

    from mcsmoe_fast.checkpoint import to_standard
    from mcsmoe_fast.merge import merge_experts
    from mcsmoe_fast.train import train
    from mcsmoe_fast.train.text import lm_batch

    model = tiny_mixtral()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(3, 128, (3, 12), generator=g)} for _ in range(2)]
    windows = torch.randint(3, 128, (4, 16), generator=g)
    kd, kd_data = kd_setup()
    result = compare_methods(model, batches, windows, ["reap", "m-smoe", "m-smoe-standard"], [0.5], progress=False,
                             kd=kd, kd_data=kd_data)
    assert result["kd_steps"] == 3 and "perplexity_kd" not in result["rows"][0]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())

    stats = collect_routing_stats(model, batches, bases=("router-logits", "feature", "expert-output"),
                                  saliency="reap", progress=False)
    merged = copy.deepcopy(model)
    merge_experts(merged, stats, 4, globally=False, similarity="router-logits", progress=False)
    one_shot = {"reap": lambda: prune_experts(model, stats, ratio=0.5, method="reap"),
                "m-smoe": lambda: copy.deepcopy(merged),
                "m-smoe-standard": lambda: to_standard(merged, router="fitted", batches=batches)}
    teacher = copy.deepcopy(model)
    for row in result["rows"][1:]:
        assert row["kd_steps"] == 3
        assert row["perplexity"] == pytest.approx(perplexity(one_shot[row["method"]](), windows), rel=1e-6)
        student = one_shot[row["method"]]()
        train(student, kd_data, kd, collate_fn=lm_batch, teacher=teacher, progress=False)
        assert row["perplexity_kd"] == pytest.approx(perplexity(student, windows), rel=1e-6), row["method"]
        assert row["perplexity_kd"] != pytest.approx(row["perplexity"], rel=1e-3), "KD changed nothing"
        for other_teacher in (None, one_shot[row["method"]]()):
            other = one_shot[row["method"]]()
            train(other, kd_data, kd, collate_fn=lm_batch, teacher=other_teacher, progress=False)
            assert perplexity(other, windows) != pytest.approx(row["perplexity_kd"], rel=1e-6)


def test_compare_command_with_kd(tmp_path, capsys):
    saved_model_and_texts(tmp_path)
    args = ["compare", "--model", tmp_path / "mixtral", "--calib", tmp_path / "calib.txt", "--eval-text",
            tmp_path / "eval.txt", "--eval-length", 16, "--methods", "reap,m-smoe-standard", "--ratios", "0.5",
            "--kd-steps", 2, "--kd-batch-size", 2, "--kd-lr", 1e-2, "--out", tmp_path / "out"]
    assert main([str(a) for a in args]) == 0
    out = capsys.readouterr().out
    assert "| perplexity | after KD (2 steps) |" in out and "| m-smoe-standard | 50% | 4 | 50.0% | standard |" in out
    rows = json.loads((tmp_path / "out" / "results.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["full", "reap", "m-smoe-standard"]
    assert all(math.isfinite(r["perplexity_kd"]) and r["perplexity_kd"] != r["perplexity"] for r in rows[1:])
    too_few = args[:-2] + ["--kd-batch-size", 10_000, "--out", tmp_path / "bad"]
    assert main([str(a) for a in too_few]) == 2
    assert "at least one batch of 10000" in capsys.readouterr().err


@pytest.mark.parametrize("reduced", ["merged", "compressed", "masked"])
@pytest.mark.parametrize("method", ["m-smoe", "reap"])
def test_a_merged_compressed_or_masked_model_is_refused_for_every_method(reduced, method):
    """compare counts the removed share from the router's experts: on a model already merged (4 slots), compressed or
    masked (strategy='drop'), its "m-smoe 50%" row was the input itself, or held 7.5x the input's expert parameters.
    Refused before the statistics pass, as the streamed compare refuses such a checkpoint."""
    from mcsmoe_fast import compress_experts, merge_experts

    model = tiny_mixtral()
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(3, 128, (3, 12), generator=g)} for _ in range(2)]
    stats = collect_routing_stats(model, batches, progress=False)
    merge_experts(model, stats, num_groups=4, strategy="drop" if reduced == "masked" else "frequency")
    if reduced == "compressed":
        compress_experts(model, rank=4, progress=False)
    with pytest.raises(ValueError, match="layer 'model.layers.0.mlp' is merged, compressed or masked: the model is an "
                                         "mcsmoe-fast checkpoint; compare the original model it was made from"):
        compare_methods(model, batches, torch.randint(3, 128, (2, 8), generator=g), [method], [0.5], progress=False)
