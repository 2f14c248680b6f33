"""`mcsmoe-fast merge` end to end, offline: tiny models with a tiny word-level tokenizer saved beside them."""
import builtins
import json

import pytest
import torch

from mcsmoe_fast import from_pretrained, moe_layers
from mcsmoe_fast.calibration_data import read_calibration_texts
from mcsmoe_fast.cli import main
from mcsmoe_fast.models.hub import load_model
from mcsmoe_fast.modules import MoEExperts
from mcsmoe_fast.tiny import tiny_mixtral, tiny_switch

LINES = [
    "the quick brown fox jumps over the lazy dog",
    "a merged expert is smaller than eight experts",
    "routers still score every original expert",
    "mixture of experts models are sparse and large",
    "calibration text decides which experts dominate",
]


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(LINES, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[EOS]", "[UNK]"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", eos_token="[EOS]", unk_token="[UNK]")


@pytest.fixture
def workspace(tmp_path):
    tok = tiny_tokenizer()
    for name, model in (("mixtral", tiny_mixtral()), ("switch", tiny_switch())):
        model.save_pretrained(tmp_path / name)
    tok.save_pretrained(tmp_path / "mixtral")  # the switch model has no tokenizer of its own
    tok.save_pretrained(tmp_path / "tokenizer")
    (tmp_path / "calib.txt").write_text("\n".join(LINES * 4) + "\n\n")
    (tmp_path / "calib.jsonl").write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(LINES)))
    return tmp_path


def run(args, capsys):
    rc = main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_merge_mixtral_from_text_file(workspace, capsys):
    out_dir = workspace / "merged"
    rc, out, err = run(["merge", "--model", workspace / "mixtral", "--calib", workspace / "calib.txt",
                        "--num-groups", 2, "--out", out_dir], capsys)
    assert rc == 0, err
    assert "model.layers.0.mlp" in out and "model.layers.1.mlp" in out
    assert "20 calibration samples; 4 groups over 2 layers" in out
    assert "MiB before" in out and "after merging" in out
    model = from_pretrained(out_dir)
    assert sum(layer.module.experts.num_slots for layer in moe_layers(model)) == 4
    assert (out_dir / "tokenizer.json").is_file()  # the merged checkpoint is usable on its own
    rc, out, err = run(["merge", "--model", out_dir, "--calib", workspace / "calib.txt", "--num-groups", 1,
                        "--no-globally", "--out", workspace / "again"], capsys)  # a merged model merges further
    assert rc == 0, err
    assert all(layer.module.experts.num_slots == 1 for layer in moe_layers(from_pretrained(workspace / "again")))


def test_merge_switch_jsonl_options_and_dense_export(workspace, capsys):
    out_dir = workspace / "dense"
    rc, out, err = run(["merge", "--model", workspace / "switch", "--tokenizer", workspace / "tokenizer",
                        "--calib", workspace / "calib.jsonl", "--num-groups", 3, "--no-globally", "--no-permute",
                        "--strategy", "average", "--similarity", "expert-output", "--grouping", "hierarchical",
                        "--layers", "1", "decoder.block.1.layer.2.mlp", "--export-dense", "--out", out_dir], capsys)
    assert rc == 0, err
    assert "5 calibration samples; 6 groups over 2 layers" in out
    vanilla = load_model(str(out_dir))
    layers = moe_layers(vanilla)
    assert not any(isinstance(layer.module.experts, MoEExperts) for layer in layers)
    w_in, _ = layers[1].expert_weights()  # 8 experts, 3 distinct weight sets
    assert w_in.shape[0] == 8 and len({tuple(w.flatten()[:4].tolist()) for w in w_in}) == 3


def test_missing_tokenizer_fails_clearly(workspace, capsys):
    rc, out, err = run(["merge", "--model", workspace / "switch", "--calib", workspace / "calib.txt",
                        "--num-groups", 2, "--out", workspace / "x"], capsys)
    assert rc == 2
    assert "tokenizer" in err and "--tokenizer" in err
    assert not (workspace / "x").exists()


def test_bad_calibration_sources_fail_clearly(workspace, capsys, monkeypatch):
    (workspace / "bad.jsonl").write_text('{"sentence": "no text field"}\n')
    rc, _, err = run(["merge", "--model", workspace / "mixtral", "--calib", workspace / "bad.jsonl",
                      "--num-groups", 2, "--out", workspace / "x"], capsys)
    assert rc == 2 and "'text'" in err
    rc, _, err = run(["merge", "--model", workspace / "mixtral", "--calib", workspace / "missing.txt",
                      "--num-groups", 2, "--out", workspace / "x"], capsys)
    assert rc == 2 and "not found" in err
    rc, _, err = run(["merge", "--model", workspace / "mixtral", "--calib", workspace / "calib.txt",
                      "--num-groups", 0, "--out", workspace / "x"], capsys)
    assert rc == 2 and "--num-groups" in err

    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError("No module named 'datasets'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    rc, _, err = run(["merge", "--model", workspace / "mixtral", "--calib", "some/hub-dataset",
                      "--num-groups", 2, "--out", workspace / "x"], capsys)
    assert rc == 2 and "datasets" in err and "pip install" in err


def test_calibration_texts_respect_num_samples(workspace):
    assert read_calibration_texts(str(workspace / "calib.txt"), 3) == LINES[:3]
    assert len(read_calibration_texts(str(workspace / "calib.txt"))) == 20  # blank lines skipped
    assert read_calibration_texts(str(workspace / "calib.jsonl"), 2) == LINES[:2]
    with pytest.raises(ValueError, match="num_samples"):
        read_calibration_texts(str(workspace / "calib.txt"), 0)


def test_tokenizer_that_does_not_fit_the_model_fails_clearly(workspace, capsys):
    from mcsmoe_fast.calibration_data import check_batches

    batch = {"input_ids": torch.tensor([[5, 200]]), "attention_mask": torch.ones(1, 2, dtype=torch.int64)}
    with pytest.raises(ValueError, match="vocabulary"):
        check_batches([batch], tiny_tokenizer(), vocab_size=128)


@pytest.mark.parametrize("command", ["merge", "permute"])
@pytest.mark.parametrize("inside", [False, True])
def test_writing_over_the_input_model_is_refused(command, inside, workspace, capsys):
    src = workspace / "mixtral"
    before = {f.name: f.read_bytes() for f in src.iterdir()}
    out = src / "merged" if inside else src
    args = [command, "--model", src, "--out", out]
    if command == "merge":
        args += ["--calib", workspace / "calib.txt", "--num-groups", 2]
    rc, _, err = run(args, capsys)
    assert rc == 2 and "input model's directory" in err, err
    assert {f.name: f.read_bytes() for f in src.iterdir()} == before


def test_missing_model_directory_fails_at_once(workspace, capsys):
    for spec in (workspace / "nonexistent", "./nonexistent", "~/nonexistent-model"):
        rc, _, err = run(["permute", "--model", spec, "--out", workspace / "x"], capsys)
        assert rc == 2 and "model directory not found" in err, err
        assert len(err.strip().splitlines()) == 1


def test_unreachable_hub_id_fails_in_one_line(workspace, capsys, monkeypatch):
    import huggingface_hub

    calls = []

    def offline(self, repo_id, **kwargs):
        calls.append(repo_id)
        raise ConnectionError("Failed to resolve host (offline)")

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", offline)
    monkeypatch.setenv("HF_HUB_CACHE", str(workspace / "empty-cache"))
    rc, _, err = run(["permute", "--model", "some-org/some-moe", "--out", workspace / "x"], capsys)
    assert rc == 2 and "'some-org/some-moe'" in err and "ConnectionError" in err, err
    assert len(err.strip().splitlines()) == 1 and calls == ["some-org/some-moe"]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rc, _, err = run(["permute", "--model", "some-org/some-moe", "--out", workspace / "x"], capsys)
    assert rc == 2 and "HF_HUB_OFFLINE" in err and len(calls) == 1


@pytest.mark.parametrize("command", ["merge", "permute", "compress"])
def test_truncated_plain_checkpoint_gives_a_clear_error(command, workspace, capsys):
    weights = workspace / "mixtral" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    args = [command, "--model", workspace / "mixtral", "--out", workspace / "x"]
    if command == "merge":
        args += ["--calib", workspace / "calib.txt", "--num-groups", 2]
    rc, _, err = run(args, capsys)
    assert rc == 2 and "does not load" in err and "mixtral" in err, err
    assert len(err.strip().splitlines()) == 1


def test_num_groups_is_checked_before_loading_and_when_nothing_merges(workspace, capsys):
    (workspace / "mixtral" / "model.safetensors").write_bytes(b"corrupt")  # loading would fail first
    for bad in (0, -3):
        rc, _, err = run(["merge", "--model", workspace / "mixtral", "--calib", workspace / "calib.txt",
                          "--num-groups", bad, "--out", workspace / "x"], capsys)
        assert rc == 2 and "--num-groups must be >= 1" in err, err
    rc, _, err = run(["merge", "--model", workspace / "switch", "--tokenizer", workspace / "tokenizer", "--calib",
                      workspace / "calib.txt", "--num-groups", 8, "--out", workspace / "x"], capsys)
    assert rc == 2 and "nothing would be merged" in err, err
    assert not (workspace / "x").exists()


def test_permute_saves_the_tokenizer_and_version_flag(workspace, capsys):
    rc, out, err = run(["permute", "--model", workspace / "mixtral", "--out", workspace / "aligned"], capsys)
    assert rc == 0, err
    assert (workspace / "aligned" / "tokenizer.json").is_file()
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    from mcsmoe_fast import __version__

    assert capsys.readouterr().out.strip() == f"mcsmoe-fast {__version__}"


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3", "gpt_oss"])
def test_merge_align_and_bench_other_families(family, workspace, capsys):
    """The CLI goes through the generic adapter: a shared expert (Qwen2-MoE), a dense first layer and
    group-limited routing (DeepSeek-V3), transposed biased experts (GPT-OSS)."""
    from mcsmoe_fast.tiny import tiny_moe

    tiny_moe(family).save_pretrained(workspace / family)
    tiny_tokenizer().save_pretrained(workspace / family)
    rc, out, err = run(["permute", "--model", workspace / family, "--out", workspace / f"{family}-aligned"], capsys)
    assert rc == 0, err
    ids = torch.randint(3, 40, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = load_model(str(workspace / family))(ids).logits
        aligned = load_model(str(workspace / f"{family}-aligned"))  # a plain transformers checkpoint
        torch.testing.assert_close(aligned(ids).logits, want, rtol=1e-5, atol=1e-5)
    rc, out, err = run(["merge", "--model", workspace / family, "--calib", workspace / "calib.txt",
                        "--num-groups", 2, "--out", workspace / f"{family}-merged"], capsys)
    assert rc == 0, err
    merged = from_pretrained(workspace / f"{family}-merged")
    assert sum(layer.module.experts.num_slots for layer in moe_layers(merged)) == 4
    rc, out, err = run(["bench", "--model", workspace / f"{family}-merged", "--tokens", 16, "--length", 8,
                        "--repeats", 1], capsys)
    assert rc == 0, err
    assert "tok/s optimize" in out
