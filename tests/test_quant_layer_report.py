"""The in-memory outputs in the input's precision (merge --format standard, prune) report the layer errors the
streamed report has (w_in, w_out, output on calibration tokens, tokens) besides the per-tensor errors, equal to an
independent recomputation (test_quant_standard.check_layer_errors: the written experts dequantized against the
same merge written dequantized, on the expert inputs of the twin's own forward); the CLI prints and records them."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

import mcsmoe_fast as mf
from mcsmoe_fast.streaming.layer_errors import LayerErrors
from mcsmoe_fast.cli import main
from mcsmoe_fast.streaming.quantized import quantize_checkpoint, requantize_saved
from mcsmoe_fast.tiny import tiny_mixtral
from merge_helpers import calibration
from test_cli_merge import LINES, tiny_tokenizer
from test_quant_standard import LAYERS, check_layer_errors
from test_quantized_merge import FP8, _experts_inputs, _twin


@pytest.fixture(scope="module")
def fp8(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant-layer-report")
    tiny_mixtral(num_experts=4, hidden_size=256, intermediate_size=128, seed=2).save_pretrained(root / "plain")
    tiny_tokenizer().save_pretrained(root / "plain")
    quantize_checkpoint(root / "plain", root / "fp8", FP8)
    (root / "calib.txt").write_text("\n".join(LINES * 2) + "\n")
    return root


def test_in_memory_standard_merge_reports_layer_errors(fp8, tmp_path):
    batches = calibration(tiny_mixtral(num_layers=1), seed=3, batches=3, batch=2, length=9)
    model = mf.open_model(str(fp8 / "fp8"), torch.float32)  # float32 work, as the twin runs
    errors = LayerErrors(model, batches)
    stats = mf.collect_routing_stats(model, batches, bases=("router-logits", "feature"), progress=False)
    errors.close()
    mf.merge_experts(model, stats, 2, globally=False, within_routing_groups=True, progress=False)
    errors.keep_merged(model)
    mf.save_pretrained(model, tmp_path / "q", format="standard", router="fitted", batches=batches)
    shutil.copytree(tmp_path / "q", tmp_path / "d")  # the same merge, dequantized
    requantize_saved(tmp_path / "q", fp8 / "fp8")
    report = errors.record(tmp_path / "q")
    assert report == json.loads((tmp_path / "q" / "config.json").read_text())["mcsmoe_quantization"]
    assert set(report["layers"]) == set(LAYERS) and set(report["max"]) == {"w_in", "w_out", "output", "weights"}
    assert report["tensors"]  # requantize_saved's per-tensor errors are kept
    inputs = _experts_inputs(mf.open_model(str(_twin(fp8 / "fp8", tmp_path / "twin", FP8)), torch.float32), batches)
    check_layer_errors(report, tmp_path / "q", tmp_path / "d", inputs)


def test_in_memory_prune_reports_layer_errors(fp8, tmp_path):
    """A pruned expert's tokens count with weight zero: the layer output is the kept experts' part of it. bf16 work
    (the CLI's): float32 values of the kept experts would re-quantize to themselves, an error of 0."""
    from mcsmoe_fast.prune import kept_experts, prune_experts

    batches = calibration(tiny_mixtral(num_layers=1), seed=4, batches=3, batch=2, length=9)
    model = mf.open_model(str(fp8 / "fp8"), torch.bfloat16)
    errors = LayerErrors(model, batches)
    stats = mf.collect_routing_stats(model, batches, saliency="reap", progress=False)
    errors.close()
    kept = kept_experts(model, stats, 2)
    pruned = prune_experts(model, stats, 2)
    errors.keep_pruned(pruned, kept, {name: 4 for name in LAYERS})
    mf.save_pretrained(pruned, tmp_path / "q", format="standard")
    shutil.copytree(tmp_path / "q", tmp_path / "d")
    requantize_saved(tmp_path / "q", fp8 / "fp8")
    report = errors.record(tmp_path / "q")
    inputs = _experts_inputs(mf.open_model(str(_twin(fp8 / "fp8", tmp_path / "twin", FP8)), torch.bfloat16), batches)
    check_layer_errors(report, tmp_path / "q", tmp_path / "d", inputs, {n: [[e] for e in kept[n]] for n in LAYERS},
                       floor=2.0 ** -12)


def _cli(args, capsys):
    rc = main([str(a) for a in args])
    out = capsys.readouterr()
    assert rc == 0, out.err
    return out.out


@pytest.mark.parametrize("command", [["merge", "--num-groups", 2, "--format", "standard"], ["prune", "--num-experts", 2]])
def test_cli_prints_and_records_layer_errors(fp8, tmp_path, capsys, command):
    out = _cli([command[0], "--model", fp8 / "fp8", "--calib", fp8 / "calib.txt", *command[1:], "--out", tmp_path / "o"],
               capsys)
    assert "layer outputs on calibration tokens" in out
    # a merge's experts are quantized afresh; a prune's kept experts are the source's, copied (renumbered or not)
    assert ("changed tensors to fp8" in out) == (command[0] == "merge"), out
    report = json.loads((tmp_path / "o" / "config.json").read_text())["mcsmoe_quantization"]
    assert set(report["layers"]) == set(LAYERS)
    for entry in report["layers"].values():
        assert entry["tokens"] > 0 and 0 < entry["output"] < 0.1 and 0 < entry["w_in"] < 2.0 ** -4


@pytest.mark.parametrize("form", [[], ["--format", "standard"]])
def test_a_device_map_merge_reports_the_layer_outputs_too(fp8, tmp_path, capsys, form):
    """The statistics pass of a --device-map merge runs on the model accelerate dispatched: its error probe takes the
    calibration samples there, so the report holds each layer's output error, as the other paths' (it had only the
    weights' errors)."""
    reports = {}
    for name, extra in {"default": [], "device-map": ["--device-map", "cpu"]}.items():
        out = _cli(["merge", "--model", fp8 / "fp8", "--calib", fp8 / "calib.txt", "--num-groups", 2, *form, *extra,
                    "--out", tmp_path / name], capsys)
        assert "layer outputs on calibration tokens" in out, out
        reports[name] = json.loads((tmp_path / name / "config.json").read_text())["mcsmoe_quantization"]["layers"]
    assert set(reports["device-map"]) == set(LAYERS)
    for layer, entry in reports["default"].items():
        got = reports["device-map"][layer]
        assert got["tokens"] == entry["tokens"] > 0
        for what in ("w_in", "w_out", "output"):
            assert got[what] == pytest.approx(entry[what], rel=1e-5), (layer, what)


def test_the_probe_takes_each_batchs_tokens_once_and_no_padding():
    """ErrorProbe keeps the experts' inputs at the batches' token positions, in batch order; the same batches run
    again (an unmerged layer in a second pass) add nothing; a mask that does not fit the experts' rows is refused."""
    from mcsmoe_fast.models import moe_layers
    from mcsmoe_fast.streaming.quantized import ErrorProbe

    model = tiny_mixtral(num_layers=1, seed=5).eval()
    batches = calibration(model, seed=6, batches=2, batch=3, length=7)
    views = {layer.name: layer for layer in moe_layers(model)}
    (name,) = views
    seen = []
    model.get_submodule(f"{name}.experts").register_forward_pre_hook(
        lambda _m, args, kwargs: seen.append([*args, *kwargs.values()][0].detach().clone()), with_kwargs=True)
    probe = ErrorProbe(views, set(views), [b["attention_mask"] for b in batches], tokens=1000)
    with torch.no_grad():
        for b in batches * 2:
            model(**b)
    probe.close()
    expected = torch.cat([h[b["attention_mask"].reshape(-1).bool()] for h, b in zip(seen, batches)])
    hidden, index, weights = probe.samples[name]
    assert expected.shape[0] == sum(int(b["attention_mask"].sum()) for b in batches) < 2 * 3 * 7
    assert torch.equal(hidden, expected) and index.shape[0] == weights.shape[0] == expected.shape[0]
    wrong = ErrorProbe(views, set(views), [torch.ones(2, 7)])
    with pytest.raises(ValueError, match="received 21 rows for calibration batch 0, whose padding mask has 14"):
        with torch.no_grad():
            model(**batches[0])
    wrong.close()
