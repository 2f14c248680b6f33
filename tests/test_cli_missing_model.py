"""Every subcommand that takes --model fails at once, in one line that names the model, when the model is
not there: a missing directory, or a bare name the Hub cannot serve (offline). Checked before any
tokenizer, config or data is read, so no loader's retries run."""
import json
import os
import subprocess
import sys
import time

import pytest

from mcsmoe_fast.cli import SUBCOMMANDS, build_parser, main

BARE = "nonexistent-model-xyz"


def with_model_option() -> list[str]:
    _, parsers = build_parser()
    return [name for name, p in parsers.items() if any("--model" in a.option_strings for a in p._actions)]


COMMANDS = ["permute", "merge", "compress", "eval", "bench", "finetune", "prune", "compare"]


def argv(command: str, model: str, tmp_path) -> list[str]:
    """The least a user would type for `command`, with real data files, so only the model is missing."""
    calib, text = tmp_path / "calib.txt", tmp_path / "text.txt"
    calib.write_text("the quick brown fox\njumps over the lazy dog\n")
    text.write_text("the quick brown fox jumps over the lazy dog\n" * 4)
    extra = {
        "permute": ["--out", tmp_path / "out"],
        "merge": ["--calib", calib, "--num-groups", 2, "--out", tmp_path / "out"],
        "compress": ["--out", tmp_path / "out"],
        "eval": ["--eval-text", text],
        "bench": ["--tokens", 8],
        "finetune": ["--text", text, "--out", tmp_path / "out", "--steps", 1],
        "prune": ["--calib", calib, "--num-experts", 2, "--out", tmp_path / "out"],
        "compare": ["--calib", calib, "--eval-text", text, "--out", tmp_path / "out"],
    }[command]
    return [str(a) for a in [command, "--model", model, *extra]]


@pytest.fixture
def no_loading(monkeypatch, tmp_path):
    """Record (and refuse) every tokenizer, config and model load, and every Hub request, so a test sees
    what ran before the error; the Hub answers as it does offline, and the cache is empty."""
    import huggingface_hub
    import transformers
    from huggingface_hub import constants

    seen = {"loads": [], "hub": []}

    def refuse(kind):
        def load(*args, **kwargs):
            seen["loads"].append((kind, str(args[-1]) if args else kwargs))
            raise OSError(f"{kind} loading refused by the test")
        return classmethod(lambda cls, *a, **k: load(*a, **k))

    for cls in ("AutoTokenizer", "AutoConfig", "AutoModelForCausalLM", "AutoModelForSeq2SeqLM"):
        monkeypatch.setattr(getattr(transformers, cls), "from_pretrained", refuse(cls))

    def offline(self, repo_id, **kwargs):
        seen["hub"].append(repo_id)
        raise ConnectionError("[Errno -2] Name or service not known")

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", offline)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return seen


def run(args, capsys):
    rc = main(args)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_every_model_subcommand_is_covered():
    assert sorted(with_model_option()) == sorted(COMMANDS)
    assert set(with_model_option()) <= set(SUBCOMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("spec", ["./nonexistent", "absolute", "~/nonexistent-model"])
def test_missing_model_directory_fails_before_anything_loads(command, spec, tmp_path, capsys, monkeypatch,
                                                              no_loading):
    monkeypatch.chdir(tmp_path)
    spec = str(tmp_path / "nonexistent") if spec == "absolute" else spec
    rc, _, err = run(argv(command, spec, tmp_path), capsys)
    assert rc == 2, err
    assert err.strip() == f"mcsmoe-fast {command}: error: model directory not found: {spec}", err
    assert no_loading == {"loads": [], "hub": []}
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", COMMANDS)
def test_bare_name_offline_is_tried_once_and_fails_in_one_line(command, tmp_path, capsys, monkeypatch, no_loading):
    monkeypatch.chdir(tmp_path)
    rc, _, err = run(argv(command, BARE, tmp_path), capsys)
    assert rc == 2, err
    assert len(err.strip().splitlines()) == 1, err
    assert f"model {BARE!r}" in err and "ConnectionError" in err, err
    assert no_loading == {"loads": [], "hub": [BARE]}  # one short request, nothing loaded before it


def test_a_file_given_as_model_is_not_a_directory(tmp_path, capsys, no_loading):
    (tmp_path / "calib.txt").write_text("text\n")
    rc, _, err = run(argv("merge", str(tmp_path / "calib.txt"), tmp_path), capsys)
    assert rc == 2 and "calib.txt is a file, not a model directory" in err, err
    assert no_loading == {"loads": [], "hub": []}


def test_missing_teacher_fails_before_anything_loads(tmp_path, capsys, no_loading):
    from mcsmoe_fast.tiny import tiny_mixtral

    tiny_mixtral().save_pretrained(tmp_path / "student")
    args = argv("finetune", str(tmp_path / "student"), tmp_path) + ["--teacher", str(tmp_path / "no-teacher")]
    rc, _, err = run(args, capsys)
    assert rc == 2 and err.strip().endswith(f"model directory not found: {tmp_path / 'no-teacher'}"), err
    assert no_loading["loads"] == [] and no_loading["hub"] == []


def test_hub_ids_still_load_when_the_hub_serves_them(tmp_path, monkeypatch):
    """Online, a bare name is asked about once and then loaded as before (here: from a local stand-in)."""
    import huggingface_hub

    from mcsmoe_fast import loading
    from mcsmoe_fast.models.hub import check_model_source
    from mcsmoe_fast.tiny import tiny_mixtral

    tiny_mixtral().save_pretrained(tmp_path / "stand-in")
    asked = []
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", lambda self, repo_id, **kw: asked.append(repo_id))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    real_load = loading.load_model
    monkeypatch.setattr(loading, "load_model",
                        lambda name, dtype=None: real_load(str(tmp_path / "stand-in"), dtype) if name == "org/moe"
                        else real_load(name, dtype))
    check_model_source("org/moe")
    model = loading.open_model("org/moe")
    assert model.config.model_type == "mixtral"
    assert asked == ["org/moe"]  # one request for the check and the load together


def test_cached_hub_id_merges_offline_without_a_request(tmp_path, capsys, monkeypatch):
    """A hub id in the Hugging Face cache passes the check and loads (model, tokenizer, --dtype auto's
    config) with no request at all: offline it meets none of huggingface_hub's retries."""
    import httpx2
    import huggingface_hub
    from huggingface_hub import constants
    from test_cli_merge import LINES, tiny_tokenizer

    from mcsmoe_fast.tiny import tiny_mixtral

    snapshot = tmp_path / "hf-cache" / "models--org--tiny-moe" / "snapshots" / "0123abcd"
    tiny_mixtral().save_pretrained(snapshot)
    tiny_tokenizer().save_pretrained(snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0123abcd")
    (tmp_path / "calib.txt").write_text("\n".join(LINES) + "\n")
    requests = []

    def offline(self, request, **kwargs):
        if not request.url.path.startswith("/api/agent-harnesses"):  # huggingface_hub's own best-effort telemetry
            requests.append(str(request.url))
        raise httpx2.ConnectError("[Errno -2] Name or service not known")

    monkeypatch.setattr(httpx2.Client, "send", offline)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", lambda self, repo_id, **kw: requests.append(repo_id))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    rc, out, err = run(["merge", "--model", "org/tiny-moe", "--calib", str(tmp_path / "calib.txt"), "--num-groups",
                        "2", "--dtype", "auto", "--out", str(tmp_path / "merged")], capsys)
    assert rc == 0, err
    assert "saved checkpoint" in out and requests == []


def test_bare_name_offline_prints_no_retry_noise(tmp_path):
    """The real loaders, no mocks, in a fresh process with an empty cache: offline (no network here) or
    online (the Hub says the repository does not exist), each subcommand ends in one line that names the
    model, with at most one line of retry noise."""
    commands = with_model_option()
    script = (
        "import json, sys, time\n"
        "from mcsmoe_fast.cli import main\n"
        "for args in json.loads(sys.argv[1]):\n"
        "    print('@@', args[0], file=sys.stderr, flush=True)\n"
        "    start = time.perf_counter()\n"
        "    rc = main(args)\n"
        "    print('@@rc', rc, round(time.perf_counter() - start, 1), file=sys.stderr, flush=True)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env["HF_HUB_CACHE"] = str(tmp_path / "empty-hf-cache")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", script, json.dumps([argv(c, BARE, tmp_path) for c in commands])],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
    print(f"{len(commands)} subcommands with a bare name: {time.perf_counter() - start:.1f} s in all")
    assert proc.returncode == 0, proc.stderr[-3000:]
    sections = proc.stderr.split("@@ ")[1:]
    assert [s.split()[0] for s in sections] == commands, proc.stderr[-3000:]
    for command, section in zip(commands, sections):
        lines = section.strip().splitlines()[1:]
        print(command, lines[-1], "|", lines[-2][:200])
        assert lines[-1].startswith("@@rc 2 "), section
        assert lines[-2].startswith(f"mcsmoe-fast {command}: error: model {BARE!r}"), section
        assert sum("Retrying in" in line for line in lines) <= 1, section
        assert len(lines) <= 3, section  # the error, at most one line of noise, the rc marker
