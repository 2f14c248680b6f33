"""A save in the input's precision opens the input (--model) again to copy the tensors the model kept byte for byte
and to take its quantization_config: an input replaced between the load and that save (another command's --out
landing on it) is refused, --out left as it was, on every path that re-reads it (prune, compress, merge --format
standard, merge of our merged checkpoint, permute in memory and streamed); unit tests of the stamp itself."""
from __future__ import annotations

import os
import shutil

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
    assert "the input changed since the model was loaded from it" in err and "Nothing was written" in err, err
    assert [p.name for p in out.iterdir()] == ["config.json"] and (out / "config.json").read_text() == "{}"
    monkeypatch.undo()  # the same command with the input left alone is written
    assert main([*command[:2], str(source.with_name("input.old")), *command[3:]]) == 0
    assert "quantization_config" in (out / "config.json").read_text()


CHANGES = {  # the file named in the refusal: a change to the input
    "model.safetensors": lambda d, other: shutil.copy(other / "model.safetensors", d / "model.safetensors"),
    "config.json": lambda d, other: (d / "config.json").write_text((d / "config.json").read_text() + " "),
    "model-00002-of-00002.safetensors": lambda d, other: (d / "model-00002-of-00002.safetensors").write_bytes(b"x"),
}


@pytest.mark.parametrize("changed", sorted(CHANGES))
def test_the_stamp_sees_each_kind_of_change(models, tmp_path, changed):
    source = tmp_path / "m"
    shutil.copytree(models / "fp8_0", source)
    stamp = source_stamp(source)
    assert {"config.json", "model.safetensors"} <= set(stamp) and "tokenizer.json" not in stamp
    (source / "tokenizer.json").write_text("{}")  # not a file the model is read from
    check_unchanged(source, stamp)
    CHANGES[changed](source, models / "fp8_1")
    with pytest.raises(CheckpointError, match=rf"{source}: the input changed .*\({changed} changed"):
        check_unchanged(source, stamp)


def test_a_removed_input_is_refused(models, tmp_path):
    shutil.copytree(models / "fp8_0", tmp_path / "m")
    stamp = source_stamp(tmp_path / "m")
    shutil.rmtree(tmp_path / "m")
    with pytest.raises(CheckpointError, match="cannot be read any more"):
        check_unchanged(tmp_path / "m", stamp)
