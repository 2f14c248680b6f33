"""A command reads its input directory more than once (the tokenizer and the weights, the generation config at save
time, a save in the input's precision that copies the input's tensors byte for byte, a streamed comparison that opens
it for every row): an input replaced meanwhile (another command's --out landing on it) is refused at the commit of
every output, the output left as it was (the CLI watches --model, --teacher and --tokenizer: source_stamp.py), on
every command and path; unit tests of the stamp itself."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

import mcsmoe_fast.streaming.permute as streamed_permute
import mcsmoe_fast.streaming.quantized as quantized
import mcsmoe_fast.streaming.requantize_merged as requantize_merged
from mcsmoe_fast.checkpoint import CheckpointError
from mcsmoe_fast.checkpoint.source_stamp import check_unchanged, source_stamp
from mcsmoe_fast.cli import main
from mcsmoe_fast.streaming.quantized import quantize_checkpoint
from mcsmoe_fast.tiny import tiny_mixtral, tiny_tokenizer
from test_cli_merge import LINES
from test_quantized_merge import FP8

CALIB = ["--num-samples", "4", "--max-length", "12"]
REFUSAL = "the input changed while this command was reading it"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two block-FP8 Mixtrals (seeds 0 and 1), calibration text, and our merged checkpoint of the first."""
    root = tmp_path_factory.mktemp("stamp")
    for seed in (0, 1):
        tiny_mixtral(num_experts=4, seed=seed).save_pretrained(root / f"plain{seed}")
        tiny_tokenizer().save_pretrained(root / f"plain{seed}")
        quantize_checkpoint(root / f"plain{seed}", root / f"fp8_{seed}", FP8)
    (root / "calib.txt").write_text("\n".join(LINES * 2) + "\n")
    assert main(["merge", "--model", str(root / "fp8_0"), "--calib", str(root / "calib.txt"), *CALIB,
                 "--num-groups", "2", "--out", str(root / "merged")]) == 0
    return root


def _replace(directory, replacement):
    """Replace `directory` by a copy of `replacement` as atomic_directory replaces an output (rename)."""
    new = directory.with_name(directory.name + ".new")
    shutil.copytree(replacement, new)
    os.rename(directory, directory.with_name(directory.name + ".old"))
    os.rename(new, directory)


def _swap_before(monkeypatch, module, name, source, replacement):
    """Replace `source` by `replacement` just before module.name (the step that reads the input again) runs."""
    original = getattr(module, name)

    def swapped(*args, **kwargs):
        _replace(source, replacement)
        return original(*args, **kwargs)
    monkeypatch.setattr(module, name, swapped)


CASES = {  # command: (arguments after --model/--out, input, the step that re-reads it)
    "prune": (["prune", "--ratio", "0.5", "--calib", "{calib}", *CALIB], "fp8_0", (quantized, "write_quantized")),
    "merge-standard": (["merge", "--num-groups", "2", "--format", "standard", "--calib", "{calib}", *CALIB], "fp8_0",
                       (quantized, "write_quantized")),
    "compress": (["compress", "--rank", "4"], "fp8_0", (requantize_merged, "requantize_merged")),
    "merge-merged": (["merge", "--num-groups", "1", "--calib", "{calib}", *CALIB], "merged",
                     (requantize_merged, "requantize_merged")),
    "permute": (["permute"], "fp8_0", (quantized, "write_quantized")),
    "permute-streamed": (["permute", "--max-memory", "1KB"], "fp8_0", (streamed_permute, "write_quantized")),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_an_input_replaced_before_the_save_is_refused(models, tmp_path, monkeypatch, capsys, case):
    argv, name, (module, step) = CASES[case]
    source = tmp_path / "input"
    shutil.copytree(models / name, source)
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")  # an earlier output: must stay as it was
    argv = [a.replace("{calib}", str(models / "calib.txt")) for a in argv]
    command = [argv[0], "--model", str(source), *argv[1:], "--out", str(out)]
    replacement = models / ("fp8_1" if name == "fp8_0" else "fp8_0")
    _swap_before(monkeypatch, module, step, source, replacement)
    assert main(command) == 2
    err = capsys.readouterr().err
    assert REFUSAL in err and "Nothing was written" in err, err
    assert [p.name for p in out.iterdir()] == ["config.json"] and (out / "config.json").read_text() == "{}"
    monkeypatch.undo()  # the same command with the input left alone is written
    assert main([*command[:2], str(source.with_name("input.old")), *command[3:]]) == 0
    assert "quantization_config" in (out / "config.json").read_text()


TEXT = ["--text", "{calib}", "--length", "8", "--batch-size", "2", "--steps", "2", "--eval-every", "1"]
PLAIN = {  # every command on a plain input: arguments after --model, where its result goes (None: printed)
    "merge": (["merge", "--num-groups", "2", "--calib", "{calib}", *CALIB], "out"),
    "prune": (["prune", "--ratio", "0.5", "--calib", "{calib}", *CALIB], "out"),
    "compress": (["compress", "--rank", "4"], "out"),
    "permute": (["permute"], "out"),
    "finetune": (["finetune", *TEXT], "out"),
    "finetune-kd": (["finetune", "--teacher", "{other}", *TEXT], "out"),
    "eval-json": (["eval", "--eval-text", "{calib}", "--length", "8"], "json"),
    "eval": (["eval", "--eval-text", "{calib}", "--length", "8"], None),
    "compare": (["compare", "--calib", "{calib}", *CALIB, "--eval-text", "{calib}", "--eval-length", "8", "--methods",
                 "reap", "--ratios", "0.5"], "out"),
}


@pytest.mark.parametrize("case", sorted(PLAIN))
def test_an_input_replaced_after_the_model_was_read_is_refused(models, tmp_path, monkeypatch, capsys, case):
    """Swapped once the model is in memory: what is read after it (the tokenizer, the generation config, the
    calibration text's tokens) would be the other checkpoint's."""
    import mcsmoe_fast.loading as loading

    argv, result = PLAIN[case]
    source = tmp_path / "input"
    shutil.copytree(models / "plain0", source)
    argv = [a.replace("{calib}", str(models / "calib.txt")).replace("{other}", str(models / "plain1")) for a in argv]
    where = {"out": ["--out", str(tmp_path / "out")], "json": ["--json", str(tmp_path / "r.json")], None: []}[result]
    _swap_after_first(monkeypatch, loading, "open_model", source, models / "plain1")
    assert main([argv[0], "--model", str(source), *argv[1:], *where]) == 2
    out, err = capsys.readouterr()
    assert REFUSAL in err, err
    assert not (tmp_path / "out").exists() and not (tmp_path / "r.json").exists()
    if case == "eval":
        assert "perplexity" not in out, out  # no figure printed
    monkeypatch.undo()  # the same command with the input left alone
    assert main([argv[0], "--model", str(source), *argv[1:], *where]) == 0


def test_a_streamed_comparison_refuses_rows_of_a_replaced_input(models, tmp_path, monkeypatch, capsys):
    """compare --max-memory opens --model for every row: the full row read from one checkpoint, the reduced rows from
    the replacement, in one table. Its first table (the full row) is written; the next is refused."""
    import mcsmoe_fast.compare_streamed as streamed

    source = tmp_path / "input"
    shutil.copytree(models / "plain0", source)
    _swap_before(monkeypatch, streamed, "reduce_checkpoint", source, models / "plain1")
    calib = str(models / "calib.txt")
    assert main(["compare", "--model", str(source), "--calib", calib, *CALIB, "--eval-text", calib, "--eval-length",
                 "8", "--methods", "reap", "--ratios", "0.5", "--max-memory", "1KB", "--out", str(tmp_path / "out")]) == 2
    assert REFUSAL in capsys.readouterr().err
    rows = json.loads((tmp_path / "out" / "results.json").read_text())["rows"]
    assert [row["method"] for row in rows] == ["full"]


def _swap_after_first(monkeypatch, module, name, source, replacement):
    """Replace `source` by `replacement` right after the first call of module.name returns."""
    original, calls = getattr(module, name), []

    def swapped(*args, **kwargs):
        result = original(*args, **kwargs)
        if not calls:
            calls.append(1)
            _replace(source, replacement)
        return result
    monkeypatch.setattr(module, name, swapped)


CHANGES = {  # the file named in the refusal: a change to the input
    "model.safetensors": lambda d, other: shutil.copy(other / "model.safetensors", d / "model.safetensors"),
    "config.json": lambda d, other: (d / "config.json").write_text((d / "config.json").read_text() + " "),
    "model-00002-of-00002.safetensors": lambda d, other: (d / "model-00002-of-00002.safetensors").write_bytes(b"x"),
    "tokenizer.json": lambda d, other: (d / "tokenizer.json").write_text("{}"),
}


@pytest.mark.parametrize("changed", sorted(CHANGES))
def test_the_stamp_sees_each_kind_of_change(models, tmp_path, changed):
    source = tmp_path / "m"
    shutil.copytree(models / "fp8_0", source)
    stamp = source_stamp(source)
    assert {"config.json", "generation_config.json", "model.safetensors"} <= set(stamp) and "README.md" not in stamp
    (source / "README.md").write_text("notes")  # not a file a model, tokenizer or settings are read from
    check_unchanged(source, stamp)
    CHANGES[changed](source, models / "fp8_1")
    with pytest.raises(CheckpointError, match=rf"{source}: {REFUSAL} \({changed} changed"):
        check_unchanged(source, stamp)


def test_a_removed_input_is_refused(models, tmp_path):
    shutil.copytree(models / "fp8_0", tmp_path / "m")
    stamp = source_stamp(tmp_path / "m")
    shutil.rmtree(tmp_path / "m")
    with pytest.raises(CheckpointError, match="cannot be read any more"):
        check_unchanged(tmp_path / "m", stamp)


def test_watching_inputs_nests_and_ends_with_its_block(models, tmp_path):
    from mcsmoe_fast.checkpoint import check_inputs, watching_inputs

    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        shutil.copytree(models / "plain0", d)
    with watching_inputs(a, None, "org/hub-id", models / "calib.txt"):  # hub ids, files and None are not watched
        with watching_inputs(a, b):
            (b / "config.json").write_text((b / "config.json").read_text() + " ")
            with pytest.raises(CheckpointError, match=f"{b}: {REFUSAL}"):
                check_inputs()
        check_inputs()  # b's watch ended with the inner block; a's (the outer block's) goes on
        (a / "config.json").write_text((a / "config.json").read_text() + " ")
        with pytest.raises(CheckpointError, match=f"{a}: {REFUSAL}"):
            check_inputs()
    check_inputs()  # nothing watched after the block


def test_the_python_api_refuses_a_save_of_a_replaced_input(models, tmp_path):
    from mcsmoe_fast.checkpoint import save_pretrained, watching_inputs
    from mcsmoe_fast.loading import open_model
    from mcsmoe_fast.streaming.quantized import save_requantized

    source = tmp_path / "input"
    shutil.copytree(models / "fp8_0", source)
    with watching_inputs(source):
        model = open_model(str(source))
        _replace(source, models / "fp8_1")
        with pytest.raises(CheckpointError, match=REFUSAL):
            save_requantized(tmp_path / "out", source, lambda d: save_pretrained(model, d, format="standard"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["finetune", "compare"])
def test_a_change_once_everything_is_read_does_not_stop_a_long_command(models, tmp_path, monkeypatch, case):
    """Training and the in-memory comparison read their inputs first and then work from memory: a change to the
    input after that reaches neither the run nor its outputs, and does not stop it."""
    import mcsmoe_fast.compare as compare
    import mcsmoe_fast.train as train

    argv, _ = PLAIN[case]
    source = tmp_path / "input"
    shutil.copytree(models / "plain0", source)
    argv = [a.replace("{calib}", str(models / "calib.txt")) for a in argv]
    module, step = (train, "train") if case == "finetune" else (compare, "compare_methods")
    _swap_before(monkeypatch, module, step, source, models / "plain1")
    assert main([argv[0], "--model", str(source), *argv[1:], "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / ("best" if case == "finetune" else "results.json")).exists()


def test_a_watch_that_fails_to_start_leaves_nothing_watched(models, tmp_path, monkeypatch):
    import mcsmoe_fast.checkpoint.source_stamp as stamps
    from mcsmoe_fast.checkpoint import check_inputs, watching_inputs

    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        shutil.copytree(models / "plain0", d)
    real = stamps.source_stamp

    def failing(directory):
        if Path(directory).name == "b":
            raise PermissionError(f"{directory}: cannot be listed")
        return real(directory)
    monkeypatch.setattr(stamps, "source_stamp", failing)
    with pytest.raises(PermissionError):
        with watching_inputs(a, b):
            pass
    (a / "config.json").write_text((a / "config.json").read_text() + " ")
    check_inputs()  # `a` is not left watched


def test_the_streamed_permute_api_refuses_an_input_replaced_before_its_requantizing_write(models, tmp_path, monkeypatch):
    from mcsmoe_fast.streaming import permute_checkpoint

    source = tmp_path / "input"
    shutil.copytree(models / "fp8_0", source)
    _swap_before(monkeypatch, streamed_permute, "write_quantized", source, models / "fp8_1")
    with pytest.raises(CheckpointError, match=REFUSAL):
        permute_checkpoint(source, tmp_path / "out", max_memory="1KB")
    assert not (tmp_path / "out").exists()
