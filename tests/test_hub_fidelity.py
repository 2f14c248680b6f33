"""Loading plain and merged checkpoints as transformers loads them (models/hub.py): dtypes of the tensors no
checkpoint holds, and model directories given with `~`."""
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

import mcsmoe_fast as mf
from mcsmoe_fast.models.hub import cast_as_loaded_, load_config, load_model
from mcsmoe_fast.tiny import tiny_moe


def _ids(length=64, seed=0):
    return torch.randint(3, 100, (2, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", ["deepseek_v3", "mixtral"])
def test_cast_as_loaded_is_transformers_own_load_in_that_dtype(family, tmp_path):
    """transformers casts only what it loads: the rotary inv_freq buffers stay float32 in a bf16 model (rounded to
    bf16 they put RoPE angles off by radians at long positions). Every tensor's dtype and the logits agree."""
    tiny_moe(family, max_position_embeddings=4096).save_pretrained(tmp_path)
    want = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    got = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    cast_as_loaded_(got, torch.bfloat16)
    dtypes = lambda m: {n: t.dtype for n, t in (*m.named_parameters(), *m.named_buffers())}  # noqa: E731
    assert dtypes(got) == dtypes(want)
    assert got.model.rotary_emb.inv_freq.dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(got(input_ids=_ids(512)).logits, want(input_ids=_ids(512)).logits)


def test_merged_checkpoint_loaded_in_bf16_keeps_float32_rotary_buffers(tmp_path):
    model = tiny_moe("mixtral")
    stats = mf.collect_routing_stats(model, [{"input_ids": _ids(16)}], progress=False)
    mf.merge_experts(model, stats, num_groups=2, progress=False)
    mf.save_pretrained(model, tmp_path)
    for dtype in (torch.bfloat16, "bfloat16", "auto", None):
        loaded = mf.from_pretrained(tmp_path, dtype=dtype)
        assert loaded.model.rotary_emb.inv_freq.dtype == torch.float32, dtype
    assert mf.from_pretrained(tmp_path, dtype=torch.bfloat16).lm_head.weight.dtype == torch.bfloat16


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tiny_moe("mixtral").save_pretrained(tmp_path / "tiny")
    return tmp_path


def test_a_model_directory_under_tilde_loads(home):
    assert os.path.expanduser("~/tiny") == str(home / "tiny")
    assert load_config("~/tiny").model_type == "mixtral"
    model = load_model("~/tiny")
    want = AutoModelForCausalLM.from_pretrained(home / "tiny").eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=_ids()).logits, want(input_ids=_ids()).logits)


def test_cli_merge_with_dtype_auto_takes_a_tilde_directory(home, capsys):
    from mcsmoe_fast.cli import main

    (home / "calib.txt").write_text("\n".join(f"line {i} of the calibration text" for i in range(8)))
    from mcsmoe_fast.tiny import tiny_tokenizer

    tiny_tokenizer().save_pretrained(home / "tiny")
    code = main(["merge", "--model", "~/tiny", "--calib", str(home / "calib.txt"), "--num-groups", "2",
                 "--dtype", "auto", "--out", str(home / "merged")])
    assert code == 0, capsys.readouterr().err
    assert mf.from_pretrained(home / "merged").config.model_type == "mixtral"
