"""Path options and --config files: `~` means the home directory for every path option, from the command line or a
file, whichever code path reads it; a key with no value, an abbreviated or repeated --config, options that would be
ignored, and exclusive options split between the file and the command line are handled by name."""
import json
import shutil

import pytest

from mcsmoe_fast.cli import main
from test_cli_merge import LINES, run, tiny_tokenizer, workspace  # noqa: F401  (fixture)

# every path-valued option of every subcommand, with what else the subcommand needs to parse
PATH_OPTIONS = {
    "merge": (["model", "calib", "out", "tokenizer", "offload_dir"], ["--num-groups", "2"]),
    "prune": (["model", "calib", "out", "tokenizer", "offload_dir"], ["--num-experts", "2"]),
    "compress": (["model", "out", "calib", "tokenizer"], []),
    "permute": (["model", "out"], []),
    "eval": (["model", "eval_data", "eval_text", "lm_eval_include", "tokenizer", "json"], []),
    "finetune": (["model", "out", "teacher", "data", "eval_data", "text", "eval_text", "tokenizer"], []),
    "compare": (["model", "calib", "eval_text", "out", "kd_text", "lm_eval_include", "offload_dir", "tokenizer"], []),
    "bench": (["model"], []),
    "demo": (["out"], []),
}


def parsed(monkeypatch, argv):
    """The arguments main hands to the subcommand (its run replaced: nothing is loaded)."""
    import mcsmoe_fast.cli as cli

    seen = []
    monkeypatch.setattr(cli.SUBCOMMANDS[argv[0]], "run", lambda args: seen.append(args) or 0)
    assert main([str(a) for a in argv]) == 0
    return seen[0]


@pytest.fixture
def home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    (home / "model").mkdir(parents=True)  # check_model_options wants the model directories there
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    return home


@pytest.mark.parametrize("command", list(PATH_OPTIONS))
@pytest.mark.parametrize("where", ["command line", "config file"])
def test_tilde_means_home_in_every_path_option(home, monkeypatch, command, where):
    dests, extra = PATH_OPTIONS[command]
    values = {dest: "~/model" if dest in ("model", "teacher") else f"~/{dest}" for dest in dests}
    if where == "command line":
        argv = [command, *extra] + [x for d, v in values.items() for x in ("--" + d.replace("_", "-"), v)]
    else:
        (home / "c.yaml").write_text("".join(f"{d}: {v}\n" for d, v in values.items()))
        argv = [command, *extra, "--config", "~/c.yaml"]
    args = parsed(monkeypatch, argv)
    assert {d: getattr(args, d) for d in dests} == {d: str(home / v[2:]) for d, v in values.items()}


def test_merge_in_memory_and_eval_write_and_read_tilde_paths_in_home(workspace, monkeypatch, capsys):
    home = workspace / "home"
    home.mkdir()
    shutil.copy(workspace / "calib.txt", home / "calib.txt")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(workspace)
    rc, _, err = run(["merge", "--model", "mixtral", "--calib", "~/calib.txt", "--num-groups", 2, "--out", "~/m"],
                     capsys)
    assert rc == 0, err
    assert (home / "m" / "config.json").is_file() and not (workspace / "~").exists()
    rc, out, err = run(["eval", "--model", "~/m", "--eval-text", "~/calib.txt", "--length", 8, "--json", "~/r.json"],
                       capsys)
    assert rc == 0, err
    rc, expected, err = run(["eval", "--model", home / "m", "--eval-text", home / "calib.txt", "--length", 8], capsys)
    assert rc == 0, err
    assert out == expected and json.loads((home / "r.json").read_text()).keys() == {"perplexity"}


@pytest.mark.parametrize("key", ["num-groups", "batch-size", "model", "permute", "globally", "export-dense"])
def test_a_config_key_without_a_value_is_refused_by_name(workspace, capsys, key):
    settings = {"model": workspace / "mixtral", "calib": workspace / "calib.txt", "num-groups": 2,
                "out": workspace / "o", key: ""}
    config = workspace / "c.yaml"
    config.write_text("".join(f"{k}: {v}\n" for k, v in settings.items()))
    rc, _, err = run(["merge", "--config", config], capsys)
    assert (rc, err) == (2, f"mcsmoe-fast merge: error: --config {config}: {key.replace('-', '_')} has no value; "
                            "give one or leave the key out\n")
    assert not (workspace / "o").exists()


def test_a_config_key_without_a_value_leaves_an_option_whose_default_is_none_unset(home, monkeypatch):
    (home / "c.yaml").write_text("tokenizer:\nlayers:\nmodel: ~/model\n")
    args = parsed(monkeypatch, ["merge", "--config", "~/c.yaml", "--calib", "c.txt", "--num-groups", 2, "--out", "o"])
    assert (args.tokenizer, args.layers, args.model) == (None, None, str(home / "model"))
    (home / "p.yaml").write_text("num-experts:\n")  # the count must still come from somewhere
    with pytest.raises(SystemExit) as exit_info:
        main(["prune", "--config", str(home / "p.yaml"), "--model", "model", "--calib", "c.txt", "--out", "o"])
    assert exit_info.value.code == 2


@pytest.mark.parametrize("option", ["--conf", "--confi", "--num-g"])
def test_abbreviated_options_are_refused(home, monkeypatch, capsys, option):
    (home / "s.yaml").write_text("layers: [0]\n")
    monkeypatch.setattr("mcsmoe_fast.cli.merge.run", lambda args: 0)
    with pytest.raises(SystemExit) as exit_info:
        main(["merge", "--model", "~/model", "--calib", "c.txt", "--num-groups", "2", "--out", "o", option, "s.yaml"])
    assert exit_info.value.code == 2
    assert f"error: unrecognized arguments: {option} s.yaml\n" in capsys.readouterr().err


def test_a_repeated_config_is_refused(home, capsys):
    (home.parent / "a.yaml").write_text("layers: [0]\n")  # in the working directory
    (home.parent / "b.yaml").write_text("layers: [1]\n")
    rc = main(["merge", "--model", "~/model", "--calib", "c.txt", "--num-groups", "2", "--out", "o",
               "--config", "a.yaml", "--config=b.yaml"])
    assert (rc, capsys.readouterr().err) == (2, "mcsmoe-fast merge: error: --config given 2 times (a.yaml, b.yaml): "
                                                "give one file (options on the command line win over it)\n")


@pytest.mark.parametrize("command,extra", [("merge", ["--num-groups", 2]), ("prune", ["--num-experts", 4])])
def test_offload_dir_without_a_budget_is_refused(workspace, capsys, command, extra):
    rc, _, err = run([command, "--model", workspace / "mixtral", "--calib", workspace / "calib.txt", *extra,
                      "--out", workspace / "o", "--offload-dir", workspace / "offload"], capsys)
    needs = "--max-memory (or --device-map)" if command == "merge" else "--max-memory"
    assert (rc, err) == (2, f"mcsmoe-fast {command}: error: --offload-dir needs {needs}: it is where the streamed "
                            f"{command} spills what exceeds the budget; without one the model is {command}d in memory\n")
    assert not (workspace / "o").exists()


@pytest.mark.parametrize("command,extra", [("merge", ["--num-groups", 2]), ("prune", ["--num-experts", 4])])
def test_offload_dir_unused_when_the_model_fits_is_said(workspace, capsys, command, extra):
    rc, out, err = run([command, "--model", workspace / "mixtral", "--calib", workspace / "calib.txt", *extra,
                        "--out", workspace / "o", "--offload-dir", workspace / "offload", "--max-memory", "1GB"], capsys)
    assert rc == 0, err
    assert f"the model fits --max-memory 1GB: {command}d in memory; --offload-dir is not used\n" in out
    assert not (workspace / "offload").exists()


@pytest.mark.parametrize("options,named,drop", [(["--quick"], "--quick", "it"), (["--out", "x"], "--out", "it"),
                                                (["--quick", "--out", "x"], "--quick and --out", "them")])
def test_demo_tour_refuses_the_options_it_would_ignore(monkeypatch, capsys, options, named, drop):
    monkeypatch.setattr("mcsmoe_fast.demo.tour.run_demo", lambda: None)
    rc = main(["demo", "--tour", *options])
    assert (rc, capsys.readouterr().err) == (
        2, f"mcsmoe-fast demo: error: {named} would be ignored: --tour runs the mechanics on random models in "
           f"seconds and keeps no files; drop {drop} or --tour\n")


def test_demo_out_defaults_to_mcsmoe_demo(monkeypatch):
    import mcsmoe_fast.demo as demo

    calls = []
    monkeypatch.setattr(demo, "run_demo", lambda out, quick: calls.append((out, quick)))
    assert main(["demo", "--quick"]) == 0 and main(["demo", "--out", "d"]) == 0
    assert calls == [("mcsmoe-demo", True), ("d", False)]


def test_prune_ratio_on_the_command_line_replaces_the_files_count(workspace, monkeypatch, capsys):
    (workspace / "p.yaml").write_text("num-experts: 6\nmethod: frequency\n")
    argv = ["prune", "--config", workspace / "p.yaml", "--model", workspace / "mixtral", "--calib",
            workspace / "calib.txt", "--out", workspace / "o"]
    args = parsed(monkeypatch, [*argv, "--ratio", 0.5])
    assert (args.num_experts, args.ratio, args.method) == (None, 0.5, "frequency")
    monkeypatch.undo()
    rc, out, err = run([*argv, "--ratio", 0.5], capsys)
    assert rc == 0, err
    assert "model.layers.0.mlp        8     4" in out and "model.layers.1.mlp        8     4" in out


def test_a_config_giving_both_exclusive_options_is_refused(workspace, capsys):
    (workspace / "p.yaml").write_text("num-experts: 6\nratio: 0.5\n")
    rc, _, err = run(["prune", "--config", workspace / "p.yaml", "--model", workspace / "mixtral", "--calib",
                      workspace / "calib.txt", "--out", workspace / "o"], capsys)
    assert (rc, err) == (2, f"mcsmoe-fast prune: error: --config {workspace / 'p.yaml'}: num_experts and ratio "
                            "exclude each other; keep one\n")
