"""Opening and saving models, second loading audit: the tokenizer a save carries is the input's, --dtype auto
reads the weights as transformers does, compress of a quantized input replaces --out once, a merged checkpoint
loads by hub id from the cache, a write-protected checkpoint directory is not replaced, and the standard format's
description names the tensors the file holds."""
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM

import mcsmoe_fast as mf
from mcsmoe_fast.calibration_data import calibration_batches
from mcsmoe_fast.cli import main
from mcsmoe_fast.cli.common import dtype_option
from mcsmoe_fast.tiny import TINY_WORDS, tiny_mixtral, tiny_moe, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def _ids(length=16, seed=0):
    return torch.randint(3, 100, (2, length), generator=torch.Generator().manual_seed(seed))


def _merged(family="mixtral"):
    model = tiny_moe(family)
    mf.merge_experts(model, mf.collect_routing_stats(model, [{"input_ids": _ids()}], progress=False), num_groups=2,
                     progress=False, globally=False)
    return model


def _files(directory):
    return {p.name: p.read_bytes() for p in sorted(Path(directory).iterdir()) if p.is_file()}


# 1. the tokenizer a save carries encodes as the input's


def test_calibration_batches_leave_the_callers_tokenizer_as_it_was(tmp_path):
    """Tokenising the calibration text (truncated to max_length, padded) must not change the caller's tokenizer:
    it is the one a save writes next to the model, and tokenizer.json would keep the calibration's truncation."""
    tokenizer = tiny_tokenizer()
    tokenizer.save_pretrained(tmp_path / "before")
    batches = calibration_batches([TINY_WORDS] * 3, tokenizer, batch_size=2, max_length=4)
    assert [tuple(b["input_ids"].shape) for b in batches] == [(2, 4), (1, 4)]
    tokenizer.save_pretrained(tmp_path / "after")
    before, after = (json.loads((tmp_path / d / "tokenizer.json").read_text()) for d in ("before", "after"))
    assert (after["truncation"], after["padding"]) == (before["truncation"], before["padding"]) == (None, None)
    text = " ".join(["fox"] * 40)
    assert len(Tokenizer.from_file(str(tmp_path / "after" / "tokenizer.json")).encode(text).ids) == 40


@pytest.mark.parametrize("fallback", ["[EOS]", "[UNK]"])
def test_calibration_batches_pad_with_eos_or_unk_without_giving_the_tokenizer_a_pad_token(fallback):
    tokenizer = tiny_tokenizer()
    tokenizer.pad_token = None
    if fallback == "[UNK]":
        tokenizer.eos_token = None
    batches = calibration_batches(["fox", "the quick fox"], tokenizer)
    fox, pad = tokenizer.convert_tokens_to_ids(["fox", fallback])
    assert batches[0]["input_ids"][0].tolist() == [fox, pad, pad]
    assert batches[0]["attention_mask"][0].tolist() == [1, 0, 0]
    assert tokenizer.pad_token is None


def test_cli_merge_saves_the_input_tokenizer_unchanged(tmp_path):
    tiny_moe("mixtral").save_pretrained(tmp_path / "src")
    tiny_tokenizer().save_pretrained(tmp_path / "src")
    (tmp_path / "calib.txt").write_text("\n".join([TINY_WORDS] * 8))
    assert main(["merge", "--model", str(tmp_path / "src"), "--calib", str(tmp_path / "calib.txt"), "--num-groups",
                 "2", "--out", str(tmp_path / "m"), "--num-samples", "8", "--max-length", "16"]) == 0
    src, out = (json.loads((tmp_path / d / "tokenizer.json").read_text()) for d in ("src", "m"))
    assert out == src
    text = " ".join(["fox"] * 40)
    assert len(Tokenizer.from_file(str(tmp_path / "m" / "tokenizer.json")).encode(text).ids) == 40


# 2. --dtype auto for a checkpoint whose config.json names no dtype


def _bf16_without_config_dtype(directory, **save):
    tiny_moe("mixtral").to(torch.bfloat16).save_pretrained(directory, **save)
    tiny_tokenizer().save_pretrained(directory)
    config = json.loads((directory / "config.json").read_text())
    config.pop("dtype", None)
    config.pop("torch_dtype", None)
    (directory / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("shards", [None, "20KB"])
def test_cli_dtype_auto_is_the_weights_dtype_when_config_names_none(tmp_path, shards):
    """transformers' dtype="auto" reads the weights when config.json names no dtype (older checkpoints)."""
    _bf16_without_config_dtype(tmp_path / "src", **({"max_shard_size": shards} if shards else {}))
    assert shards is None or (tmp_path / "src" / "model.safetensors.index.json").is_file()
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "src", dtype="auto").lm_head.weight.dtype
    assert theirs == torch.bfloat16
    assert dtype_option(SimpleNamespace(dtype="auto", model=str(tmp_path / "src"))) == theirs


def test_cli_merge_dtype_auto_saves_a_bf16_checkpoint_in_bf16(tmp_path):
    _bf16_without_config_dtype(tmp_path / "src")
    (tmp_path / "calib.txt").write_text("\n".join([TINY_WORDS] * 8))
    assert main(["merge", "--model", str(tmp_path / "src"), "--calib", str(tmp_path / "calib.txt"), "--num-groups",
                 "2", "--out", str(tmp_path / "o"), "--num-samples", "8", "--dtype", "auto"]) == 0
    assert json.loads((tmp_path / "o" / "config.json").read_text())["mcsmoe_merge"]["dtype"] == "bfloat16"


# 3. compress of a block-FP8 input replaces --out once


def test_interrupted_requantization_leaves_the_previous_compress_output(tmp_path, monkeypatch):
    import mcsmoe_fast.quant.requantize as requantize
    from mcsmoe_fast.streaming.quantized import quantize_checkpoint

    fp8 = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    tiny_mixtral(num_experts=4, hidden_size=128, intermediate_size=128, seed=6).save_pretrained(tmp_path / "plain")
    tiny_tokenizer().save_pretrained(tmp_path / "plain")
    quantize_checkpoint(tmp_path / "plain", tmp_path / "fp8", fp8)
    out = tmp_path / "out"
    command = ["compress", "--model", str(tmp_path / "fp8"), "--rank", "8", "--keep-ratio", "0.2", "--out", str(out)]
    assert main(command) == 0
    before = _files(out)
    assert "quantization_config" in json.loads(before["config.json"])

    def interrupted(self, *args, **kwargs):  # Ctrl-C (or a full disk) during the re-quantization
        raise KeyboardInterrupt

    monkeypatch.setattr(requantize.LikeSource, "parts", interrupted)
    with pytest.raises(KeyboardInterrupt):
        main(command + ["--rank", "4"])
    assert _files(out) == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


# 4. a merged or compressed checkpoint named by hub id, from the Hugging Face cache


def _to_cache(cache: Path, source: Path, repo: str) -> Path:
    """The layout huggingface_hub's snapshot_download leaves: models--org--name/{refs/main, snapshots/<sha>/...}."""
    repo_dir = cache / ("models--" + repo.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / ("a" * 40)
    shutil.copytree(source, snapshot)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text("a" * 40)
    return snapshot


@pytest.mark.parametrize("compressed", [False, True])
def test_merged_checkpoint_by_hub_id_loads_from_the_cache(tmp_path, monkeypatch, compressed):
    from huggingface_hub import constants

    model = _merged()
    if compressed:
        mf.compress_experts(model, rank=4, keep_ratio=0.2)
    mf.save_pretrained(model, tmp_path / "merged", max_shard_size="40KB")
    snapshot = _to_cache(tmp_path / "hf-cache", tmp_path / "merged", "org/merged")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    got = mf.open_model("org/merged")
    want = mf.from_pretrained(snapshot)
    assert dict(got.named_parameters()).keys() == dict(want.named_parameters()).keys()
    with torch.no_grad():
        assert torch.equal(got(input_ids=_ids()).logits, want(input_ids=_ids()).logits)


def test_merged_checkpoint_by_hub_id_with_its_weights_not_cached_says_so(tmp_path, monkeypatch):
    """Offline, a cached config.json alone is not the checkpoint: the error names the hub id and the cache."""
    from huggingface_hub import constants

    mf.save_pretrained(_merged(), tmp_path / "merged")
    snapshot = _to_cache(tmp_path / "hf-cache", tmp_path / "merged", "org/merged")
    (snapshot / "mcsmoe_model.safetensors").unlink()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="'org/merged'.*HF_HUB_OFFLINE"):
        mf.open_model("org/merged")


# 5. a write-protected checkpoint directory


def test_save_over_a_write_protected_checkpoint_is_refused(tmp_path):
    """Run without root's override of file permissions (as a normal user saves): the directory the user
    write-protected is refused by name, untouched, with nothing hidden left beside it."""
    script = textwrap.dedent(f"""
        import os
        from pathlib import Path
        import mcsmoe_fast as mf
        from mcsmoe_fast.tiny import tiny_moe
        ck = Path({str(tmp_path / "ck")!r})
        model = tiny_moe("mixtral")
        mf.save_pretrained(model, ck)
        before = {{p.name: p.read_bytes() for p in ck.iterdir()}}
        os.chmod(ck, 0o555)
        try:
            mf.save_pretrained(model, ck)
            print("SAVED")
        except PermissionError as exc:
            print("REFUSED", exc)
        assert {{p.name: p.read_bytes() for p in ck.iterdir()}} == before, "replaced"
        assert not os.access(ck, os.W_OK), "the write-protected directory was replaced by a writable one"
        print("HIDDEN", sorted(p.name for p in ck.parent.iterdir() if p.name.startswith(".")))
    """)
    command = [sys.executable, "-c", script]
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("root without setpriv: file permissions do not apply")
        caps = "-dac_override,-dac_read_search,-fowner"
        command = ["setpriv", f"--bounding-set={caps}", f"--inh-caps={caps}", *command]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=300)
    finally:
        for p in (tmp_path, *tmp_path.rglob("*")):
            if p.is_dir():
                os.chmod(p, 0o755)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"REFUSED {tmp_path / 'ck'} is write-protected" in proc.stdout, proc.stdout
    assert "HIDDEN []" in proc.stdout, proc.stdout


# 6. docs/standard_format.md names the layout the standard checkpoint has


@pytest.mark.parametrize("family, owner", [("mixtral", "Mixtral's"), ("qwen2_moe", "Qwen-MoE's"),
                                           ("gpt_oss", "GPT-OSS's")])
def test_standard_format_intro_names_the_tensors_the_file_holds(tmp_path, family, owner):
    intro = (ROOT / "docs" / "standard_format.md").read_text().split("\n## ")[0]
    named = re.search(rf"{re.escape(owner)}[^`]*`([^`]+)`", intro.replace("\n", " "))
    assert named, f"the introduction names no tensors of {owner} family"
    mf.save_pretrained(_merged(family), tmp_path / "s", format="standard", router="dominant")
    with safe_open(str(tmp_path / "s" / "model.safetensors"), "pt") as f:
        stored = [n for n in f.keys() if ".layers.0." in n]
    stem, _, last = named.group(1).replace("{e}", "0").rpartition(".")
    alternatives = re.sub(r"\[(\w+)\]", "", last).split("/")
    for leaf in alternatives:
        assert any(f".{stem}.{leaf}" in n for n in stored), (named.group(1), leaf, stored)


def test_task_batches_leave_the_tokenizers_truncation_and_padding_as_they_were():
    """encode_pairs / target_token_ids (the task calibration and the training collate function) call the tokenizer
    with truncation and padding; a fast tokenizer's backend kept them, and a later save wrote them into
    tokenizer.json (a Switch merged with --task saved a tokenizer that truncates every input)."""
    from mcsmoe_fast.tasks.batches import encode_pairs
    from mcsmoe_fast.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    before = (tok._tokenizer.truncation, tok._tokenizer.padding)
    batch = encode_pairs(tok, [("a b c d e f", "positive"), ("a", "negative")], max_source_length=3, max_target_length=2)
    assert batch["input_ids"].shape[1] == 3  # the batch itself is cut as asked
    assert (tok._tokenizer.truncation, tok._tokenizer.padding) == before
    tok._tokenizer.enable_truncation(max_length=7)  # settings the caller made are put back too
    encode_pairs(tok, [("a b c", "positive")], max_source_length=2, max_target_length=2)
    assert tok._tokenizer.truncation["max_length"] == 7


def test_a_write_protected_checkpoint_is_refused_for_root_too(tmp_path):
    """os.access grants root everything: the directory's own mode bits tell that the user protected it."""
    import mcsmoe_fast as mf
    from mcsmoe_fast.tiny import tiny_moe

    ck = tmp_path / "ck"
    model = tiny_moe("mixtral")
    mf.save_pretrained(model, ck)
    before = {p.name: p.read_bytes() for p in ck.iterdir()}
    os.chmod(ck, 0o555)
    try:
        with pytest.raises(PermissionError, match="is write-protected"):
            mf.save_pretrained(model, ck)
        assert {p.name: p.read_bytes() for p in ck.iterdir()} == before and ck.stat().st_mode & 0o777 == 0o555
    finally:
        os.chmod(ck, 0o755)
