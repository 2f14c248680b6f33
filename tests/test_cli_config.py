"""`--config FILE`: settings from YAML or JSON, the command line wins, and every bad file is one clear
line; every subcommand's --help ends with a worked example."""
import json

import pytest

from mcsmoe_fast.cli import SUBCOMMANDS, main
from test_cli_merge import LINES, run, tiny_tokenizer, workspace  # noqa: F401  (fixture)


def slots(path):
    from mcsmoe_fast import from_pretrained, moe_layers

    return [layer.module.experts.num_slots for layer in moe_layers(from_pretrained(path))]


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_settings_come_from_the_file_and_the_command_line_wins(workspace, capsys, suffix):
    settings = {"model": str(workspace / "mixtral"), "calib": str(workspace / "calib.txt"), "num-groups": 2,
                "globally": False, "out": str(workspace / f"from-file{suffix}")}
    config = workspace / f"merge{suffix}"
    config.write_text(json.dumps(settings) if suffix == ".json" else "\n".join(f"{k}: {json.dumps(v)}" for k, v in settings.items()))
    rc, _, err = run(["merge", "--config", config], capsys)
    assert rc == 0, err
    assert slots(workspace / f"from-file{suffix}") == [2, 2]
    rc, _, err = run(["merge", "--config", config, "--num-groups", "3", "--out", workspace / "override"], capsys)
    assert rc == 0, err
    assert slots(workspace / "override") == [3, 3]


@pytest.mark.parametrize("content,name,match", [
    ("num-groupz: 2\n", "c.yaml", r"unknown settings \['num_groupz'\]"),
    ("num-groups: [2\n", "c.yaml", "not valid YAML"),
    ("{\"num-groups\": 2,}", "c.json", "not valid JSON"),
    ("- 1\n- 2\n", "c.yaml", "expected a mapping"),
    ("similarity: cosine\n", "c.yaml", "similarity must be one of"),
    ("num-groups: two\n", "c.yaml", "num_groups: invalid literal"),
])
def test_bad_config_files_are_one_clear_line(tmp_path, capsys, content, name, match):
    (tmp_path / name).write_text(content)
    assert main(["merge", "--config", str(tmp_path / name)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("mcsmoe-fast merge: error: --config")
    import re
    assert re.search(match, err), err


def test_missing_config_file(tmp_path, capsys):
    assert main(["compress", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "no such file" in capsys.readouterr().err


@pytest.mark.parametrize("name", list(SUBCOMMANDS))
def test_every_help_has_a_worked_example(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "example:\n  mcsmoe-fast " + name in out and "--config FILE" in out
