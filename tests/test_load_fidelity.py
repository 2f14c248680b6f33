"""from_pretrained gives back exactly the saved model, or refuses with an error that names the file and the key:
tensors reloaded in the dtype they were stored in, config.json checked against the weights, plain checkpoints
with missing tensors refused, one shard file open at a time, dtype names and "auto", malformed mcsmoe_merge
sections and offloaded models refused, and a re-save keeping the tokenizer saved next to the weights."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mcsmoe_fast import collect_routing_stats, from_pretrained, merge_experts, open_model, save_pretrained
from mcsmoe_fast.checkpoint import WEIGHTS_NAME, CheckpointError, WeightFiles, open_weights, read_section
from mcsmoe_fast.models.hub import load_model
from mcsmoe_fast.modules import slot_names
from mcsmoe_fast.tiny import tiny_moe, tiny_switch, tiny_tokenizer
from merge_helpers import calibration, forward


def merged(model, num_groups=2, **kwargs):
    batches = calibration(model)
    stats = collect_routing_stats(model, batches, progress=False)
    merge_experts(model, stats, num_groups, globally=False, progress=False, **kwargs)
    return model, batches


def tensors(model):
    with slot_names():
        return model.state_dict()


def assert_same_tensors(loaded, reference):
    """Same names, dtypes and values, bit for bit."""
    a, b = tensors(loaded), tensors(reference)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, f"{name}: {a[name].dtype} != {b[name].dtype}"
        assert torch.equal(a[name], b[name]), name


def edit_config(path, change):
    config = json.loads((path / "config.json").read_text())
    change(config)
    (path / "config.json").write_text(json.dumps(config))


def copy_edited(path, name, change):
    out = path.parent / name
    shutil.copytree(path, out)
    edit_config(out, change)
    return out


# --- 1. stored dtypes ------------------------------------------------------------------------------------
def test_float32_router_of_a_bfloat16_model_reloads_unrounded(tmp_path):
    tiny_switch(num_layers=2).save_pretrained(tmp_path / "base")
    model, batches = merged(load_model(str(tmp_path / "base"), dtype=torch.bfloat16))
    routers = [m for n, m in model.named_modules() if n.endswith("router.classifier")]
    with torch.no_grad():  # transformers' router runs its classifier in float32; one KD step gives it such values
        for router in routers:
            assert router.weight.dtype == torch.float32
            router.weight.add_(torch.randn_like(router.weight) * 1e-3)
    path = save_pretrained(model, tmp_path / "merged")
    loaded = from_pretrained(path)
    assert_same_tensors(loaded, model)
    for b in batches:
        assert torch.equal(forward(loaded, b), forward(model, b))
    as_float32 = tensors(from_pretrained(path, dtype=torch.float32))  # asked for: cast from the stored values
    for name, t in tensors(model).items():
        if name.endswith("router.classifier.weight"):
            assert torch.equal(as_float32[name], t)


# --- 2. config.json against the weights ------------------------------------------------------------------
@pytest.fixture
def untied(tmp_path):
    model, _ = merged(tiny_moe("mixtral", tie_word_embeddings=False))
    return save_pretrained(model, tmp_path / "untied")


def test_alias_over_a_tensor_the_weights_store_is_refused(untied):
    path = copy_edited(untied, "aliased", lambda c: c["mcsmoe_merge"].update(
        aliases={"lm_head.weight": "model.embed_tokens.weight"}))
    with pytest.raises(CheckpointError, match=r"config\.json.*'lm_head\.weight'.*stores itself"):
        from_pretrained(path)


def test_config_tying_tensors_the_weights_store_apart_is_refused(untied):
    path = copy_edited(untied, "tied", lambda c: c.update(tie_word_embeddings=True))
    with pytest.raises(CheckpointError, match=r"config\.json ties .*lm_head\.weight.*different tensors"):
        from_pretrained(path)


# --- 3. plain checkpoints missing tensors ------------------------------------------------------------------
@pytest.mark.parametrize("sharded", [False, True])
def test_plain_checkpoint_missing_a_tensor_is_refused(sharded, tmp_path):
    model = tiny_moe("mixtral")
    model.save_pretrained(tmp_path, **({"max_shard_size": "20KB"} if sharded else {}))
    assert_same_tensors(from_pretrained(tmp_path), model)
    gone = "model.layers.1.self_attn.q_proj.weight"
    file = tmp_path / "model.safetensors"
    if sharded:  # the index omits it and its shard lacks it
        index = tmp_path / "model.safetensors.index.json"
        raw = json.loads(index.read_text())
        file = tmp_path / raw["weight_map"].pop(gone)
        index.write_text(json.dumps(raw))
    stored = load_file(str(file))
    del stored[gone]
    save_file(stored, str(file), metadata={"format": "pt"})
    for load in (from_pretrained, open_model):
        with pytest.raises(CheckpointError, match=rf"{tmp_path}.*lack.*{gone}"):
            load(str(tmp_path))


# --- 4. one shard open at a time --------------------------------------------------------------------------
def test_load_holds_one_shard_file_open_at_a_time(tmp_path, monkeypatch):
    model = tiny_switch(num_layers=2)
    path = save_pretrained(model, tmp_path / "ck", max_shard_size=1)  # a shard per tensor
    assert len(list(path.glob("mcsmoe_model-*.safetensors"))) > 50
    open_counts = []
    read_into = WeightFiles.read_into

    def counting(self, name, out):
        result = read_into(self, name, out)
        open_counts.append(len(self.handles))
        return result

    monkeypatch.setattr(WeightFiles, "read_into", counting)
    assert_same_tensors(from_pretrained(path), model)
    assert max(open_counts) == 1


def test_a_failed_copy_closes_every_file(tmp_path):
    path = save_pretrained(tiny_switch(num_layers=2), tmp_path / "ck", max_shard_size=1)
    weights = open_weights(path, read_section(path), verify=False)
    targets = {n: torch.empty(s, dtype=weights.dtypes[n]) for n, s in weights.shapes.items()}
    wrong = sorted(targets, key=lambda n: weights.file_of(n))[10]
    targets[wrong] = torch.empty(0)
    with pytest.raises(CheckpointError, match="shape"):
        weights.copy_into(targets)
    assert weights.handles == {}


# --- 5. dtype names and "auto" -----------------------------------------------------------------------------
def test_dtype_by_name_and_auto_on_merged_and_plain_checkpoints(tmp_path):
    model, _ = merged(tiny_moe("mixtral"))
    path = save_pretrained(model, tmp_path / "merged")
    assert_same_tensors(from_pretrained(path, dtype="bfloat16"), from_pretrained(path, dtype=torch.bfloat16))
    assert_same_tensors(open_model(str(path), dtype="bfloat16"), from_pretrained(path, dtype=torch.bfloat16))
    assert_same_tensors(from_pretrained(path, dtype="auto"), model)
    plain = tiny_moe("mixtral").to(torch.bfloat16)
    plain.save_pretrained(tmp_path / "plain")
    assert_same_tensors(from_pretrained(tmp_path / "plain", dtype="auto"), plain)
    for where in (path, tmp_path / "plain"):
        for bad in (torch.int8, "int8", "float99"):
            with pytest.raises(ValueError, match=rf"dtype must be a floating-point .*got {bad!r}"):
                from_pretrained(where, dtype=bad)


# --- 6. malformed sections, offloaded models ------------------------------------------------------------------
LAYER = "model.layers.0.mlp"
MALFORMED = {
    "dtype": (lambda c: c["mcsmoe_merge"].update(dtype="float99"), r"dtype 'float99' is not a floating-point"),
    "layers": (lambda c: c["mcsmoe_merge"].update(layers=[1]), r"layers must be a mapping"),
    "dropped": (lambda c: c["mcsmoe_merge"]["layers"][LAYER].update(dropped=[99]),
                r"dropped expert 99 out of range for 8 experts"),
}


@pytest.mark.parametrize("key", sorted(MALFORMED))
def test_malformed_section_refused_naming_the_key(key, tmp_path):
    model, _ = merged(tiny_moe("mixtral"), strategy="drop")
    change, message = MALFORMED[key]
    path = copy_edited(save_pretrained(model, tmp_path / "ck"), "edited", change)
    with pytest.raises(CheckpointError, match=rf"config\.json.*{message}"):
        from_pretrained(path)


def test_weight_file_names_outside_the_checkpoint_refused(tmp_path):
    model, _ = merged(tiny_moe("mixtral"))
    single = save_pretrained(model, tmp_path / "single")
    outside = copy_edited(single, "outside", lambda c: c["mcsmoe_merge"].update(weights=str(single / WEIGHTS_NAME)))
    with pytest.raises(CheckpointError, match=r"config\.json.*weights .* must be a file name inside the checkpoint"):
        from_pretrained(outside)
    sharded = save_pretrained(model, tmp_path / "sharded", max_shard_size=20000)

    def rename_shard(c):
        shards = c["mcsmoe_merge"]["shards"]
        first = sorted(shards)[0]
        shards[f"../sharded/{first}"] = shards.pop(first)

    with pytest.raises(CheckpointError, match=r"config\.json.*shards .* must be a file name inside the checkpoint"):
        from_pretrained(copy_edited(sharded, "parent", rename_shard))


def test_saving_a_model_with_offloaded_parameters_is_refused_before_writing(tmp_path):
    model = tiny_moe("mixtral")
    q_proj = model.model.layers[1].self_attn.q_proj
    q_proj.weight = nn.Parameter(torch.empty_like(q_proj.weight, device="meta"))  # as accelerate's disk offload
    for export_dense in (False, True):
        with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.q_proj\.weight.*offloaded"):
            save_pretrained(model, tmp_path / "ck", export_dense=export_dense)
    assert not (tmp_path / "ck").exists()


# --- 7. re-saving keeps the tokenizer -------------------------------------------------------------------------
def test_resave_keeps_the_tokenizer_and_replaces_the_weights(tmp_path):
    model, batches = merged(tiny_moe("mixtral"))
    target = tmp_path / "ck"
    save_pretrained(model, target, max_shard_size=20000)
    tiny_tokenizer().save_pretrained(target)
    (target / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    kept = {p.name: p.read_bytes() for p in target.iterdir()
            if p.name.startswith(("tokenizer", "special_tokens_map", "chat_template"))}
    assert "tokenizer.json" in kept and "chat_template.jinja" in kept
    save_pretrained(model, target)  # one weights file now: the shards and their index go
    assert sorted(os.listdir(target)) == sorted(["config.json", "generation_config.json", WEIGHTS_NAME, *kept])
    assert {n: (target / n).read_bytes() for n in kept} == kept
    assert torch.equal(forward(from_pretrained(target), batches[0]), forward(model, batches[0]))
    other = tiny_tokenizer("other words entirely")  # a tokenizer saved with the model replaces the kept one
    other.save_pretrained(tmp_path / "other")
    save_pretrained(model, target, tokenizer=other)
    assert (target / "tokenizer.json").read_bytes() == (tmp_path / "other" / "tokenizer.json").read_bytes()


def test_saving_tensors_the_config_ties_but_the_model_holds_apart_is_refused(tmp_path):
    """A model built under no_init_weights (transformers 5) holds its embeddings and lm_head apart although its config
    ties them: the save wrote a checkpoint its own from_pretrained refused. Refused at the save, before writing."""
    from transformers import SwitchTransformersForConditionalGeneration
    from transformers.initialization import no_init_weights

    config = tiny_switch().config
    with no_init_weights():
        model = SwitchTransformersForConditionalGeneration(config)
    assert config.tie_word_embeddings and model.shared.weight is not model.lm_head.weight
    with pytest.raises(ValueError, match=r"ties '.*' to 'shared.weight' but the model holds them as different"):
        save_pretrained(model, tmp_path / "ck")
    assert not (tmp_path / "ck").exists()
    model.tie_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    assert_same_tensors(from_pretrained(save_pretrained(model, tmp_path / "ck")), model)


def test_a_weights_file_replaced_between_reads_is_refused(tmp_path):
    """Files are closed between layers and opened again by name: a file another command replaced meanwhile (here
    a checkpoint saved again into the same directory) is refused, not read at the first file's offsets."""
    model = tiny_switch(num_layers=2)
    path = save_pretrained(model, tmp_path / "ck")
    weights = open_weights(path, read_section(path), verify=False)
    name = next(iter(weights.shapes))
    first = weights.read_into(name, torch.empty(weights.shapes[name], dtype=weights.dtypes[name])).clone()
    weights.release()
    assert torch.equal(weights.read_into(name, torch.empty_like(first)), first)  # the same file: read again
    weights.release()
    with torch.no_grad():
        next(model.parameters()).add_(1)
    save_pretrained(model, tmp_path / "ck")
    with pytest.raises(CheckpointError, match="changed while it was being read"):
        weights.read_into(name, torch.empty_like(first))
    assert weights.handles == {}
