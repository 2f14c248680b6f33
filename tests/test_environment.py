"""The user's environment (session 36's environment audit; each test failed before its fix): two saves of the same
model write the same bytes (safetensors wrote its metadata keys in a random order, so the file and the sha256
config.json records differed run to run); UTF-8 files are read as UTF-8 whatever the locale; HF_HUB_OFFLINE is read
as huggingface_hub reads it; from_pretrained expands "~" as save_pretrained does."""
import hashlib
import os
import subprocess
import sys
import textwrap

import pytest

import mcsmoe_fast as mf
from mcsmoe_fast.models import hub
from mcsmoe_fast.tiny import tiny_mixtral


def test_saving_the_same_model_twice_writes_the_same_bytes(tmp_path):
    model = tiny_mixtral(num_experts=4, num_layers=1)
    digests = set()
    for i in range(4):
        mf.save_pretrained(model, tmp_path / f"out{i}")
        digests.add(tuple(hashlib.sha256((tmp_path / f"out{i}" / name).read_bytes()).hexdigest()
                          for name in ("mcsmoe_model.safetensors", "config.json")))
    assert len(digests) == 1


LOCALE_C = r'''
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from test_cli_merge import tiny_tokenizer
from mcsmoe_fast.checkpoint.load import read_config_json
from mcsmoe_fast.cli.config_file import read_config
from mcsmoe_fast.train.text import text_windows
d = Path(sys.argv[1])
(d / "t.txt").write_bytes("the quick brown fox caf\u00e9 \u4e2d\u6587\n".encode("utf-8") * 4)
text_windows(d / "t.txt", tiny_tokenizer(), 4)
(d / "m").mkdir()
(d / "m" / "config.json").write_bytes(json.dumps({"model_type": "mixtral", "note": "mod\u00e8le"},
                                                 ensure_ascii=False).encode("utf-8"))
assert read_config_json(d / "m")["note"] == "mod\u00e8le"
(d / "c.yaml").write_bytes("out: /data/mod\u00e8les/merged\n".encode("utf-8"))
assert read_config(str(d / "c.yaml"))["out"] == "/data/mod\u00e8les/merged"
'''


def test_utf8_files_are_read_as_utf8_under_a_c_locale(tmp_path):
    env = dict(os.environ, LC_ALL="C", LANG="C", PYTHONCOERCECLOCALE="0", PYTHONUTF8="0", OMP_NUM_THREADS="1")
    child = subprocess.run([sys.executable, "-c", textwrap.dedent(LOCALE_C), str(tmp_path),
                            os.path.dirname(__file__)], env=env, capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stderr[-2000:]


@pytest.mark.parametrize("value, offline", [("off", False), ("no", False), ("FALSE", False), ("0", False),
                                            ("1", True), ("ON", True), ("yes", True), ("true", True)])
def test_hf_hub_offline_is_read_as_huggingface_hub_reads_it(monkeypatch, value, offline):
    import huggingface_hub

    asked = []
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", lambda self, repo, **k: asked.append(repo))
    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    monkeypatch.setattr(hub, "_SERVED", set())
    if offline:
        with pytest.raises(ValueError, match="HF_HUB_OFFLINE is set"):
            hub.check_hub("someorg/model")
        assert not asked
    else:
        hub.check_hub("someorg/model")
        assert asked == ["someorg/model"]


def test_from_pretrained_reads_the_home_directory_save_pretrained_wrote(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    model = tiny_mixtral(num_experts=4, num_layers=1)
    mf.save_pretrained(model, "~/merged")
    assert (tmp_path / "merged" / "config.json").is_file()
    loaded = mf.from_pretrained("~/merged")
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert a.equal(b), name
