"""The command line doing what it says: `permute` saves atomically like every other writer (it wrote into a
directory of the user's files and left a half-written checkpoint on a crash), --config values converted as the
command line converts them ("false" was true, "10" was layers 1 and 0), config.json naming the dtype the weights
have, options that would be ignored refused by name, and the sections of config.json describing what the
checkpoint holds."""
import json
import subprocess
import sys

import pytest
import torch

from mcsmoe_fast import from_pretrained, moe_layers
from mcsmoe_fast.cli import main
from mcsmoe_fast.tiny import tiny_mixtral
from test_cli_merge import LINES, tiny_tokenizer


@pytest.fixture(scope="module")
def space(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_fidelity")
    tok = tiny_tokenizer()
    for name, dtype in (("mixtral", torch.float32), ("mixtral_bf16", torch.bfloat16)):
        tiny_mixtral().to(dtype).save_pretrained(root / name)
        tok.save_pretrained(root / name)
    (root / "calib.txt").write_text("\n".join(LINES * 4) + "\n")
    assert main([str(a) for a in ("merge", "--model", root / "mixtral", "--calib", root / "calib.txt", "--num-groups",
                                  4, "--out", root / "merged")]) == 0
    assert main([str(a) for a in ("compress", "--model", root / "merged", "--rank", 2, "--out", root / "mc")]) == 0
    return root


def run(args, capsys):
    rc = main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def section(directory, name="mcsmoe_merge"):
    return json.loads((directory / "config.json").read_text()).get(name)


def test_permute_refuses_a_directory_of_the_users_files_and_replaces_a_checkpoint_atomically(space, tmp_path, capsys,
                                                                                              monkeypatch):
    mine = tmp_path / "my_project"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    (mine / "config.json").write_text("{}")
    rc, _, err = run(["permute", "--model", space / "mixtral", "--out", mine], capsys)
    assert rc == 2 and "holds notes.txt" in err
    assert sorted(p.name for p in mine.iterdir()) == ["config.json", "notes.txt"]
    assert (mine / "config.json").read_text() == "{}"
    out = tmp_path / "aligned"
    assert run(["permute", "--model", space / "mixtral", "--out", out], capsys)[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    import transformers

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", crash)
    with pytest.raises(KeyboardInterrupt):
        main([str(a) for a in ("permute", "--model", space / "mixtral", "--reference", 1, "--out", out)])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the previous checkpoint, as it was


@pytest.mark.parametrize("text,permute", [('{"permute": "false"}', False), ('{"permute": "no"}', False),
                                          ('{"permute": false}', False), ('{"permute": "true"}', True)])
def test_config_on_off_values_are_read_as_booleans(space, tmp_path, capsys, text, permute):
    config = tmp_path / "c.json"
    config.write_text(text)
    args = ["merge", "--model", space / "mixtral", "--calib", space / "calib.txt", "--num-groups", 4,
            "--out", tmp_path / "m", "--config", config]
    assert run(args, capsys)[0] == 0
    assert section(tmp_path / "m")["merges"][-1]["method"]["permute"] is permute
    config.write_text('{"permute": "perhaps"}')
    rc, _, err = run(args, capsys)
    assert rc == 2 and "permute: expected true or false, got 'perhaps'" in err


@pytest.mark.parametrize("text,error", [
    ("layers: '10'\n", "layer"), ("layers: 1\n", None), ("num-groups: 2.7\n", "invalid literal for int"),
    ("num-groups: true\n", "expected a number"), ("layers: [0, '1']\n", None)])
def test_config_values_are_converted_as_the_command_line_converts_them(space, tmp_path, capsys, text, error):
    config = tmp_path / "c.yaml"
    config.write_text(text + ("" if "num-groups" in text else "num-groups: 2\n"))
    args = ["merge", "--model", space / "mixtral", "--calib", space / "calib.txt", "--out", tmp_path / "m",
            "--config", config]
    rc, _, err = run(args, capsys)
    if error is None:
        assert rc == 0, err
        merged = section(tmp_path / "m")["layers"]
        assert sorted(merged) == (["model.layers.1.mlp"] if text == "layers: 1\n" else
                                  ["model.layers.0.mlp", "model.layers.1.mlp"])
    else:
        assert rc == 2 and error in err and "Traceback" not in err, err


def test_prune_takes_its_expert_count_from_the_config_file(space, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("num-experts: 4\nmethod: frequency\n")
    rc, _, err = run(["prune", "--model", space / "mixtral", "--calib", space / "calib.txt", "--out", tmp_path / "p",
                      "--config", config], capsys)
    assert rc == 0, err
    assert {layer.num_experts for layer in moe_layers(from_pretrained(tmp_path / "p"))} == {4}


def test_config_json_names_the_dtype_the_weights_have(space, tmp_path, capsys):
    assert run(["merge", "--model", space / "merged", "--calib", space / "calib.txt", "--num-groups", 2,
                "--dtype", "bfloat16", "--out", tmp_path / "bf16"], capsys)[0] == 0
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert config["dtype"] == config["mcsmoe_merge"]["dtype"] == "bfloat16"
    assert from_pretrained(tmp_path / "bf16", dtype=torch.float32).config.dtype == torch.float32
    # a merged bf16 checkpoint merged again keeps bf16 (merge's --dtype default is for plain checkpoints)
    assert run(["merge", "--model", space / "mixtral_bf16", "--calib", space / "calib.txt", "--num-groups", 4,
                "--dtype", "auto", "--out", tmp_path / "m"], capsys)[0] == 0
    assert run(["merge", "--model", tmp_path / "m", "--calib", space / "calib.txt", "--num-groups", 2,
                "--out", tmp_path / "mm"], capsys)[0] == 0
    assert section(tmp_path / "m")["dtype"] == section(tmp_path / "mm")["dtype"] == "bfloat16"


def test_sections_describe_what_the_checkpoint_holds(space, tmp_path, capsys):
    assert section(space / "mc", "mcsmoe_compress")["layers"]
    assert run(["merge", "--model", space / "mc", "--calib", space / "calib.txt", "--num-groups", 2,
                "--out", tmp_path / "merged_again"], capsys)[0] == 0
    layers = section(tmp_path / "merged_again")["layers"]
    assert not any("compressed" in entry for entry in layers.values())
    assert section(tmp_path / "merged_again", "mcsmoe_compress") is None
    assert run(["merge", "--model", space / "mc", "--calib", space / "calib.txt", "--num-groups", 2,
                "--export-dense", "--out", tmp_path / "dense"], capsys)[0] == 0
    config = json.loads((tmp_path / "dense" / "config.json").read_text())
    assert "mcsmoe_merge" not in config and "mcsmoe_compress" not in config


@pytest.mark.parametrize("args,error", [
    (["merge", "--model", "{merged}", "--calib", "{calib}", "--num-groups", 4, "--out", "{out}"],
     "not below the number of experts (or merged slots) per layer (4)"),
    (["compress", "--model", "{merged}", "--calib", "{calib}", "--out", "{out}"],
     "--calib is read for --importance activation only"),
    (["finetune", "--model", "{merged}", "--eval-text", "{calib}", "--text", "{calib}", "--steps", 1,
      "--temperature", 3, "--out", "{out}"], "--temperature weigh the distillation from --teacher"),
    (["finetune", "--model", "{merged}", "--text", "{calib}", "--length", 8, "--steps", 1, "--batch-size", 0,
      "--out", "{out}"],
     "batch_size must be >= 1, got 0"),
    (["finetune", "--model", "{merged}", "--text", "{calib}", "--length", 8, "--steps", 1, "--lr", 0,
      "--out", "{out}"],
     "learning_rate must be > 0, got 0"),
    (["eval", "--model", "{merged}", "--eval-text", "{calib}", "--num-fewshot", 5], "--num-fewshot need --lm-eval"),
    (["eval", "--model", "{merged}", "--eval-text", "{calib}", "--eval-data", "{calib}"],
     "--eval-data are files of a --task"),
    (["compare", "--model", "{mixtral}", "--calib", "{calib}", "--eval-text", "{calib}", "--methods", "reap",
      "--ratios", "0.5", "--kd-lr", 5, "--out", "{out}"], "--kd-lr need --kd-steps"),
    (["compare", "--model", "{mixtral}", "--calib", "{calib}", "--eval-text", "{calib}", "--methods", "reap",
      "--ratios", "0.5", "--out", "{mixtral}/results"], "is inside the input model's directory"),
    (["prune", "--model", "{mixtral}", "--calib", "{calib}", "--num-experts", 4, "--method", "frequency",
      "--saliency", "reap-softmax", "--out", "{out}"], "--saliency chooses REAP's routing weight"),
    (["bench", "--model", "{mixtral}", "--tokens", 200, "--length", 128], "--tokens [200] not a multiple of --length"),
    (["permute", "--model", "{merged}", "--out", "{out}"], "is a merged (or compressed) checkpoint"),
], ids=lambda v: v[0] if isinstance(v, list) else None)
def test_options_that_would_be_ignored_or_misread_are_refused_by_name(space, tmp_path, capsys, args, error):
    paths = {"merged": space / "merged", "mixtral": space / "mixtral", "calib": space / "calib.txt",
             "out": tmp_path / "out"}
    before = sorted(p.name for p in (space / "mixtral").iterdir())
    rc, _, err = run([str(a).format(**paths) for a in args], capsys)
    assert rc == 2 and error in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in (space / "mixtral").iterdir()) == before


def test_python_dash_m_runs_the_command_line():
    done = subprocess.run([sys.executable, "-m", "mcsmoe_fast", "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.startswith("mcsmoe-fast ")


@pytest.mark.parametrize("command", ["merge", "compress", "prune", "permute"])
def test_an_out_holding_the_users_files_is_refused_before_any_work(space, tmp_path, capsys, monkeypatch, command):
    import mcsmoe_fast.loading

    def loaded(*args, **kwargs):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(mcsmoe_fast.loading, "open_model", loaded)
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    model = space / ("merged" if command == "compress" else "mixtral")
    extra = {"merge": ["--calib", space / "calib.txt", "--num-groups", 2], "compress": [],
             "prune": ["--calib", space / "calib.txt", "--num-experts", 4], "permute": []}[command]
    rc, _, err = run([command, "--model", model, *extra, "--out", out], capsys)
    assert rc == 2 and "is a non-empty directory that is not a checkpoint; refusing to replace it" in err, err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_help_texts_print_percent_signs_once(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    text = capsys.readouterr().out
    assert "25% and 50%" in text and "%%" not in text
