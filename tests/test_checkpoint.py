"""Merged checkpoints: exact round trips, really fewer bytes, dense export, atomic saves, clean errors."""
import json
import os

import pytest
import torch
from safetensors import safe_open

from mcsmoe_fast import collect_routing_stats, from_pretrained, merge_experts, moe_layers, save_pretrained
from mcsmoe_fast.checkpoint import WEIGHTS_NAME, CheckpointError
from mcsmoe_fast.models.hub import load_model
from mcsmoe_fast.modules import MoEExperts
from merge_helpers import build, calibration, forward

FAMILIES = ["switch", "mixtral"]


def merged(family, tmp_path, num_groups=2, **kwargs):
    model = build(family, tmp_path)
    batches = calibration(model)
    stats = collect_routing_stats(model, batches, progress=False)
    merge_experts(model, stats, num_groups, globally=False, progress=False, **kwargs)
    return model, batches


def parameter_count(model):
    return sum(p.numel() for p in model.parameters())


def expert_bytes(path, names):
    """Bytes of the expert tensors (names containing '.experts.') of a safetensors file."""
    with safe_open(str(path), "pt") as f:
        return sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size()
                   for k in f.keys() if ".experts." in k and not k.endswith("expert_map"))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("strategy", ["frequency", "drop"])
def test_round_trip_restores_exact_outputs(family, strategy, tmp_path):
    model, batches = merged(family, tmp_path, strategy=strategy)
    path = save_pretrained(model, tmp_path / "merged")
    loaded = from_pretrained(path)
    assert not loaded.training
    for b in batches:
        assert torch.equal(forward(loaded, b), forward(model, b))
    for a, b in zip(moe_layers(model), moe_layers(loaded)):
        assert a.name == b.name
        assert isinstance(b.module.experts, MoEExperts)
        assert torch.equal(a.module.experts.expert_map, b.module.experts.expert_map)
        assert b.module.experts.num_slots == 2
    assert parameter_count(loaded) == parameter_count(model)
    assert loaded.config.mcsmoe_merge["merges"][0]["method"]["strategy"] == strategy
    assert sorted(os.listdir(path)) == ["config.json", "generation_config.json", WEIGHTS_NAME]  # JSON + safetensors, nothing pickled


@pytest.mark.parametrize("family", FAMILIES)
def test_eight_experts_in_two_groups_store_four_times_fewer_expert_bytes(family, tmp_path):
    original = build(family, tmp_path)
    dense_bytes = expert_bytes(tmp_path / f"{family}-base" / "model.safetensors", None)
    full_params = parameter_count(original)
    model, _ = merged(family, tmp_path)
    path = save_pretrained(model, tmp_path / "merged")
    merged_bytes = expert_bytes(path / WEIGHTS_NAME, None)
    assert dense_bytes == 4 * merged_bytes
    loaded = from_pretrained(path)
    layers = moe_layers(loaded)
    expert_params = sum(t.numel() for layer in moe_layers(original) for t in layer.expert_weights())
    assert parameter_count(loaded) == full_params - expert_params + expert_params // 4
    in_memory = sum(layer.module.experts.w_in.numel() + layer.module.experts.w_out.numel() for layer in layers)
    assert in_memory * 4 == expert_params
    assert (path / WEIGHTS_NAME).stat().st_size < (tmp_path / f"{family}-base" / "model.safetensors").stat().st_size


@pytest.mark.parametrize("family", FAMILIES)
def test_export_dense_loads_in_plain_transformers(family, tmp_path):
    model, batches = merged(family, tmp_path)
    path = save_pretrained(model, tmp_path / "dense", export_dense=True)
    assert (path / "model.safetensors").is_file() and not (path / WEIGHTS_NAME).exists()
    assert "mcsmoe_merge" not in json.loads((path / "config.json").read_text())
    vanilla = load_model(str(path))  # transformers' own from_pretrained
    assert not any(isinstance(layer.module.experts, MoEExperts) for layer in moe_layers(vanilla))
    for b in batches:
        torch.testing.assert_close(forward(vanilla, b), forward(model, b), rtol=1e-5, atol=1e-5)
    assert from_pretrained(path).config.model_type == model.config.model_type  # plain dirs load too


def test_export_dense_refuses_dropped_experts(tmp_path):
    model, _ = merged("mixtral", tmp_path, strategy="drop")
    with pytest.raises(ValueError, match="dropped experts"):
        save_pretrained(model, tmp_path / "dense", export_dense=True)
    assert not (tmp_path / "dense").exists()


def test_unmerged_model_round_trip_and_tied_weights(tmp_path):
    model = build("switch", tmp_path)  # shared input/output embeddings are stored once
    path = save_pretrained(model, tmp_path / "plain")
    loaded = from_pretrained(path)
    batch = calibration(model)[0]
    assert torch.equal(forward(loaded, batch), forward(model, batch))
    assert parameter_count(loaded) == parameter_count(model)
    assert json.loads((path / "config.json").read_text())["mcsmoe_merge"]["aliases"]


def test_save_replaces_previous_checkpoint_and_failed_save_keeps_it(tmp_path, monkeypatch):
    model, _ = merged("mixtral", tmp_path)
    target = tmp_path / "ckpt"
    save_pretrained(model, target)
    save_pretrained(model, target)  # replacing a checkpoint works
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    import safetensors.torch

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt("simulated interruption while writing weights")

    monkeypatch.setattr(safetensors.torch, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_pretrained(model, target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp dir left
    from_pretrained(target)


def test_refuses_to_replace_a_directory_that_is_not_a_checkpoint(tmp_path):
    model, _ = merged("mixtral", tmp_path)
    target = tmp_path / "notes"
    target.mkdir()
    (target / "important.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a checkpoint"):
        save_pretrained(model, target)
    assert (target / "important.txt").read_text() == "keep me"


@pytest.fixture
def checkpoint(tmp_path):
    model, _ = merged("mixtral", tmp_path)
    return save_pretrained(model, tmp_path / "ckpt")


def edit_config(path, change):
    config = json.loads((path / "config.json").read_text())
    change(config)
    (path / "config.json").write_text(json.dumps(config))


def test_truncated_weights_rejected(checkpoint):
    weights = checkpoint / WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        from_pretrained(checkpoint)


def test_corrupt_weight_bytes_rejected(checkpoint):
    weights = checkpoint / WEIGHTS_NAME
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        from_pretrained(checkpoint)


def test_garbage_weights_file_rejected_even_without_verification(checkpoint):
    weights = checkpoint / WEIGHTS_NAME
    size = weights.stat().st_size
    weights.write_bytes(b"\xff" * size)
    with pytest.raises(CheckpointError, match="unreadable safetensors"):
        from_pretrained(checkpoint, verify=False)


def test_missing_weights_and_bad_config_rejected(checkpoint, tmp_path):
    config_text = (checkpoint / "config.json").read_text()
    (checkpoint / "config.json").write_text(config_text[: len(config_text) // 2])
    with pytest.raises(CheckpointError, match="corrupt JSON"):
        from_pretrained(checkpoint)
    (checkpoint / "config.json").write_text(config_text)
    os.remove(checkpoint / WEIGHTS_NAME)
    with pytest.raises(CheckpointError, match="missing"):
        from_pretrained(checkpoint)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        from_pretrained(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        from_pretrained(tmp_path / "empty")


def test_config_that_does_not_match_the_weights_rejected(checkpoint):
    edit_config(checkpoint, lambda c: c.update(num_hidden_layers=3))
    with pytest.raises(CheckpointError, match="do not match"):
        from_pretrained(checkpoint)


def test_expert_map_mismatch_rejected(checkpoint):
    def swap(c):
        layer = next(iter(c["mcsmoe_merge"]["layers"].values()))
        layer["expert_map"] = layer["expert_map"][::-1]
    edit_config(checkpoint, swap)
    with pytest.raises(CheckpointError, match="expert_map"):
        from_pretrained(checkpoint)


def test_unknown_layer_and_format_version_rejected(checkpoint):
    edit_config(checkpoint, lambda c: c["mcsmoe_merge"]["layers"].update({"model.layers.9.mlp": {"num_experts": 8}}))
    with pytest.raises(CheckpointError, match="not an MoE layer"):
        from_pretrained(checkpoint)
    edit_config(checkpoint, lambda c: c["mcsmoe_merge"].update(format_version=99))
    with pytest.raises(CheckpointError, match="format_version"):
        from_pretrained(checkpoint)


def test_checkpoint_errors_are_value_errors():
    assert issubclass(CheckpointError, ValueError)  # the CLI reports ValueErrors cleanly


def test_a_killed_saves_temporary_directory_is_removed_by_the_next_save(tmp_path):
    """SIGKILL leaves the temporary directory behind (nothing runs to remove it); the next save to the
    same target removes it, but never one whose writer is still alive."""
    import subprocess
    import sys

    from mcsmoe_fast.checkpoint import OWNER_FILE
    from mcsmoe_fast.tiny import tiny_mixtral

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale, live = tmp_path / ".ckpt.tmp-dead0000", tmp_path / ".ckpt.tmp-live0000"
    for d, pid in ((stale, dead.pid), (live, os.getppid())):
        d.mkdir()
        (d / OWNER_FILE).write_text(str(pid))
        (d / "mcsmoe_model.safetensors").write_bytes(b"half written")
    foreign = tmp_path / ".ckpt.tmp-foreign"  # no owner file: not ours to judge
    foreign.mkdir()
    save_pretrained(tiny_mixtral(num_layers=1), tmp_path / "ckpt")
    assert not stale.exists() and live.exists() and foreign.exists()
    assert not (tmp_path / "ckpt" / OWNER_FILE).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".ckpt.tmp-foreign", ".ckpt.tmp-live0000", "ckpt"]
