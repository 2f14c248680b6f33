"""Outputs that must not depend on the process that wrote them: the tokenizer a command saves is the input's,
without the settings transformers used to find its files."""
import json

from mcsmoe_fast.calibration_data import load_tokenizer
from mcsmoe_fast.tiny import tiny_tokenizer


def test_a_saved_tokenizer_config_is_the_inputs_whatever_hf_hub_offline_says(tmp_path, monkeypatch):
    tiny_tokenizer().save_pretrained(tmp_path / "m")
    written = []
    for offline in ("0", "1"):
        monkeypatch.setenv("HF_HUB_OFFLINE", offline)
        load_tokenizer(str(tmp_path / "m")).save_pretrained(tmp_path / f"out{offline}")
        written.append(json.loads((tmp_path / f"out{offline}" / "tokenizer_config.json").read_text()))
    source = json.loads((tmp_path / "m" / "tokenizer_config.json").read_text())
    assert written[0] == written[1] == source
    assert not {"is_local", "local_files_only"} & set(written[0])

