"""The standard (and dense) export beyond tests/test_standard_export.py: cases where the exported model
must compute exactly what the merged model computes through mcsmoe_fast, checked on the checkpoint as plain
transformers loads it (one subprocess that never imports mcsmoe_fast), and the safety of the writes.

Exact cases (fp32, 1e-5): every expert its own group in a shuffled slot order (M = E, an unsorted expert_map),
for every family; uneven, unsorted groups (one group of 5, singletons) when the merged model's routing is confined
to the dominant experts (drop mask, GPT-OSS's router bias, DeepSeek-V3's correction bias), where dominant router
rows are exact; the dense export of uneven groups whatever the routing; compressed experts written densely;
top-1 with one group under a renormalising gate; bf16; tied embeddings with shards."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import mcsmoe_fast as mf
from mcsmoe_fast.checkpoint import to_standard
from mcsmoe_fast.models.hub import load_model
from mcsmoe_fast.tiny import FAMILY_NAMES, tiny_moe, tiny_switch
from merge_helpers import build, calibration, forward
from test_standard_export import merge_by_hand

FAMILIES = ("switch",) + FAMILY_NAMES + ("llama4_text",)

SHUFFLED = [[3], [0], [6], [1], [7], [2], [5], [4]]  # slot s holds expert SHUFFLED[s][0]: expert_map unsorted
UNEVEN = [[5, 0, 1, 2, 3], [4], [7], [6]]  # dominant first: one group of 5 around expert 5, three singletons
# DeepSeek-V3 (routing groups 0-3 and 4-7): uneven groups inside them, slots interleaving the routing groups
DEEPSEEK_UNEVEN = [[6, 4, 7], [1], [2, 0, 3], [5]]
DENSE_FAMILIES = ("switch", "gpt_oss", "deepseek_v3", "llama4_text")
COMPRESSED_FAMILIES = ("switch", "gpt_oss")

LOADER = textwrap.dedent("""
    import json, sys
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM
    for job in json.loads(sys.argv[1]):
        config = AutoConfig.from_pretrained(job["dir"])
        cls = AutoModelForSeq2SeqLM if config.model_type == "switch_transformers" else AutoModelForCausalLM
        model, info = cls.from_pretrained(job["dir"], output_loading_info=True, dtype="auto")
        with torch.no_grad():
            logits = model.eval()(**load_file(job["inputs"])).logits
        save_file({"logits": logits.contiguous()}, job["out"])
        emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
        json.dump({"info": {k: sorted(map(str, v)) for k, v in info.items()}, "dtype": str(model.dtype),
                   "tied": emb.data_ptr() == head.data_ptr()}, open(job["out"] + ".json", "w"))
    assert not any(m.startswith("mcsmoe_fast") for m in sys.modules), "the loader imported mcsmoe_fast"
""")


def routing_on_dominants(model, groups):
    """Confine the merged model's routing to the groups' dominant experts (groups[i][0]) exactly: the drop mask
    where the router can be masked, else a -1e4 router bias (GPT-OSS) or correction bias (DeepSeek-V3) on the
    others. The standard model with the dominant rows then computes what the merged model computes."""
    for layer in mf.moe_layers(model):
        keep = torch.zeros(layer.num_experts, dtype=torch.bool)
        keep[[g[0] for g in groups]] = True
        router = getattr(layer, "router", None)
        if router is not None and hasattr(router, "e_score_correction_bias"):
            router.e_score_correction_bias.data[~keep] = -1e4
        elif router is not None and getattr(router, "bias", None) is not None:
            router.bias.data[~keep] = -1e4
        else:
            layer.mask_router(keep)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one thread is as fast and keeps clear of OpenMP spin-waiting on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Exports:
    """Checkpoints written here, loaded back by vanilla transformers in one subprocess: load_all() gives
    {key: (our logits, extra, their logits, their report: loading info, dtype, tied embeddings)}."""

    def __init__(self, tmp):
        self.tmp, self.jobs, self.ours = tmp, [], {}

    def add(self, key, model, batch, ours, extra=None, **save):
        out = mf.save_pretrained(model, self.tmp / f"{key}-out", **save)
        inputs = dict(batch)
        if model.config.model_type == "switch_transformers":
            inputs["decoder_input_ids"] = inputs["input_ids"][:, :7]
        save_file({k: v.contiguous() for k, v in inputs.items()}, self.tmp / f"{key}-inputs.safetensors")
        self.jobs.append({"dir": str(out), "inputs": str(self.tmp / f"{key}-inputs.safetensors"),
                          "out": str(self.tmp / f"{key}-logits.safetensors"), "key": key})
        self.ours[key] = (ours, extra)
        return out

    def load_all(self):
        env = dict(os.environ, OMP_NUM_THREADS="1")  # tiny models: threads only add contention on a shared machine
        subprocess.run([sys.executable, "-c", LOADER, json.dumps(self.jobs)], check=True, cwd=self.tmp, env=env)
        return {j["key"]: (*self.ours[j["key"]], load_file(j["out"])["logits"], json.loads(open(j["out"] + ".json").read()))
                for j in self.jobs}


def merged_by_hand(family, tmp, groups):
    model = build(family, tmp)
    batch = calibration(model, batches=1)[0]
    merge_by_hand(model, groups, mf.collect_routing_stats(model, [batch], progress=False))
    return model, batch


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("exports")
    ex = Exports(tmp)
    for family in FAMILIES:
        original = build(family, tmp)
        batch = calibration(original, batches=1)[0]
        reference = forward(original, batch)
        model, _ = merged_by_hand(family, tmp, SHUFFLED)
        ex.add(f"shuffled-{family}", model, batch, forward(model, batch), reference, format="standard", router="dominant")
    for family in FAMILIES:
        if family in ("qwen3_next", "qwen3_5_moe"):
            continue  # a plain softmax top-k router that cannot be masked: no exact case (test_unmaskable_families_export_...)
        groups = DEEPSEEK_UNEVEN if family == "deepseek_v3" else UNEVEN
        model, batch = merged_by_hand(family, tmp, groups)
        if family in DENSE_FAMILIES:  # every expert its group's weights, the router as it is: exact for any routing
            ex.add(f"dense-{family}", model, batch, forward(model, batch), export_dense=True)
        routing_on_dominants(model, groups)
        ex.add(f"uneven-{family}", model, batch, forward(model, batch), to_standard(model, router="dominant").config,
               format="standard", router="dominant")
    for family in COMPRESSED_FAMILIES:
        model, batch = merged_by_hand(family, tmp, SHUFFLED)
        mf.compress_experts(model, rank=4, keep_ratio=0.2, progress=False)
        ours = forward(model, batch)
        ex.add(f"compressed-standard-{family}", model, batch, ours, format="standard", router="dominant")
        ex.add(f"compressed-dense-{family}", model, batch, ours, export_dense=True)
    model = tiny_moe("mixtral", top_k=1)
    batch = calibration(model, batches=1)[0]
    mf.merge_experts(model, mf.collect_routing_stats(model, [batch], progress=False), 1, globally=False, progress=False)
    ex.add("one-group-top1", model, batch, forward(model, batch), format="standard", router="dominant")
    tiny_moe("mixtral", tie_word_embeddings=True).save_pretrained(tmp / "tied-base")
    model = load_model(str(tmp / "tied-base"))
    batch = calibration(model, batches=1)[0]
    merge_by_hand(model, SHUFFLED, mf.collect_routing_stats(model, [batch], progress=False))
    ex.add("tied-sharded", model, batch, forward(model, batch), format="standard", router="dominant",
           max_shard_size="20KB")
    tiny_moe("gpt_oss").to(torch.bfloat16).save_pretrained(tmp / "bf16-base")
    model = load_model(str(tmp / "bf16-base"), dtype=torch.bfloat16)
    batch = calibration(model, batches=1)[0]
    mf.merge_experts(model, mf.collect_routing_stats(model, [batch], progress=False), 4, globally=False,
                     progress=False)
    ex.add("bf16", model, batch, forward(model, batch), forward(to_standard(model, batches=[batch]), batch),
           format="standard", batches=[batch])
    return ex.load_all()


def no_loading_problems(report):
    assert all(not v for v in report["info"].values()), report["info"]  # no missing, unexpected or mismatched keys


@pytest.mark.parametrize("family", FAMILIES)
def test_shuffled_singleton_groups_export_the_merged_and_original_model_exactly(exported, family):
    """M = E with an unsorted expert_map: the standard checkpoint (experts in slot order, router rows reordered
    alike; DeepSeek-V3 reordered routing group by routing group) is the original model up to the experts' order."""
    ours, original, theirs, report = exported[f"shuffled-{family}"]
    no_loading_problems(report)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(theirs, original, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in ("qwen3_next", "qwen3_5_moe")])
def test_uneven_unsorted_groups_export_exactly_when_routing_is_on_the_dominant_experts(exported, family):
    ours, config, theirs, report = exported[f"uneven-{family}"]
    no_loading_problems(report)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    layers = config.mcsmoe_standard["layers"]
    expected = ({"groups": [[1], [0, 2, 3], [4, 6, 7], [5]], "router_rows": [1, 2, 6, 5]} if family == "deepseek_v3"
                else {"groups": [[0, 1, 2, 3, 5], [4], [7], [6]], "router_rows": [5, 4, 7, 6]})
    assert all(entry == expected for entry in layers.values()), layers


@pytest.mark.parametrize("family", ["qwen3_next", "qwen3_5_moe"])
def test_unmaskable_families_export_uneven_unsorted_groups_as_slots_and_dominant_rows(family, tmp_path):
    """Routers that cannot be confined to the dominant experts: the standard experts are the merged slots in slot
    order, each router row its group's dominant expert's, every other tensor the merged model's."""
    model, _ = merged_by_hand(family, tmp_path, UNEVEN)
    standard = to_standard(model, router="dominant")
    rows = [g[0] for g in UNEVEN]
    for old, new in zip(mf.moe_layers(model), mf.moe_layers(standard), strict=True):
        assert new.num_experts == 4
        torch.testing.assert_close(new.router_weight(), old.router_weight()[rows], rtol=0, atol=0)
        for a, b in zip(new.expert_weights(), old.expert_weights(), strict=True):
            torch.testing.assert_close(a, b.detach(), rtol=0, atol=0)
    skip = tuple(f"{layer.name}." for layer in mf.moe_layers(model))
    ours, theirs = model.state_dict(), standard.state_dict()
    shared = [k for k in theirs if not k.startswith(skip)]
    assert shared and all(torch.equal(theirs[k], ours[k]) for k in shared)
    assert standard.config.num_experts == 4


@pytest.mark.parametrize("family", DENSE_FAMILIES)
def test_dense_export_of_uneven_unsorted_groups_computes_the_merged_model(exported, family):
    ours, _, theirs, report = exported[f"dense-{family}"]
    no_loading_problems(report)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["standard", "dense"])
@pytest.mark.parametrize("family", COMPRESSED_FAMILIES)
def test_compressed_experts_exported_densely_compute_the_compressed_model(exported, family, kind):
    ours, _, theirs, report = exported[f"compressed-{kind}-{family}"]
    no_loading_problems(report)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_one_group_under_a_renormalising_top1_gate_exports_exactly(exported):
    ours, _, theirs, report = exported["one-group-top1"]
    no_loading_problems(report)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_tied_embeddings_stay_tied_in_a_sharded_standard_checkpoint(exported):
    ours, _, theirs, report = exported["tied-sharded"]
    no_loading_problems(report)
    assert report["tied"]
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_bf16_standard_checkpoint_stays_bf16_and_loads_as_written(exported):
    ours, standard, theirs, report = exported["bf16"]
    no_loading_problems(report)
    assert report["dtype"] == "torch.bfloat16" and theirs.dtype == torch.bfloat16
    torch.testing.assert_close(theirs, standard, rtol=0, atol=0)


def test_bf16_standard_tensors_are_the_merged_bf16_tensors(tmp_path):
    """On disk every tensor is bf16; loaded back, the experts are the merged slots in slot order, the router rows
    the dominant experts' and every other tensor the merged model's, bit for bit."""
    tiny_moe("mixtral").to(torch.bfloat16).save_pretrained(tmp_path / "base")
    model = load_model(str(tmp_path / "base"), dtype=torch.bfloat16)
    batch = calibration(model, batches=1)[0]
    merge_by_hand(model, SHUFFLED, mf.collect_routing_stats(model, [batch], progress=False))
    out = mf.save_pretrained(model, tmp_path / "std", format="standard", router="dominant")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    plain = load_model(str(out), dtype=torch.bfloat16)
    rows = [g[0] for g in SHUFFLED]
    skip = []
    for old, new in zip(mf.moe_layers(model), mf.moe_layers(plain), strict=True):
        assert torch.equal(new.router_weight(), old.router_weight()[rows])
        for a, b in zip(new.expert_weights(), old.expert_weights(), strict=True):
            assert a.dtype == torch.bfloat16 and torch.equal(a, b.detach())
        skip.append(f"{old.name}.")
    ours, theirs = model.state_dict(), plain.state_dict()
    shared = [k for k in theirs if not k.startswith(tuple(skip))]
    assert shared and all(torch.equal(theirs[k], ours[k]) for k in shared)


def test_switch_drop_export_with_the_original_capacity_equals_the_merged_model_when_capacity_binds():
    """Capacity 2 with 10-token sequences: tokens past capacity are dropped in the merged model; the standard
    model given the original capacity drops the same ones (every kept expert receives only its own tokens)."""
    model = tiny_switch(expert_capacity=2)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 128, (3, 10), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    mf.merge_experts(model, mf.collect_routing_stats(model, [batch], progress=False), 4, globally=False,
                     strategy="drop", progress=False)
    standard = to_standard(model, router="dominant", expert_capacity=2)
    torch.testing.assert_close(forward(standard, batch), forward(model, batch), rtol=1e-5, atol=1e-5)
    assert standard.config.expert_capacity == 2


# --- the writes ------------------------------------------------------------------------------------------------
def snapshot(path):
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def merged_mixtral(tmp_path):
    model = build("mixtral", tmp_path)
    batches = calibration(model, batches=1)
    mf.merge_experts(model, mf.collect_routing_stats(model, batches, progress=False), 4, globally=False,
                     progress=False)
    return model, batches


@pytest.mark.parametrize("save", [dict(format="standard", router="dominant"), dict(format="standard", router="fitted"),
                                  dict(export_dense=True)], ids=["dominant", "fitted", "dense"])
def test_interrupted_export_keeps_the_previous_checkpoint(tmp_path, monkeypatch, save):
    """transformers' writer interrupted after a weights file is written, or the extra files step failing: the
    previous checkpoint is left byte for byte, and no temporary directory is left."""
    import transformers.modeling_utils as modeling_utils

    model, batches = merged_mixtral(tmp_path)
    if save.get("router") == "fitted":
        save = dict(save, batches=batches)
    target = tmp_path / "ckpt"
    mf.save_pretrained(model, target, format="standard", router="dominant")
    before = snapshot(target)
    written = modeling_utils.safe_save_file

    def interrupted(*args, **kwargs):
        written(*args, **kwargs)
        raise KeyboardInterrupt("simulated interruption after writing a weights file")

    monkeypatch.setattr(modeling_utils, "safe_save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        mf.save_pretrained(model, target, **save)
    monkeypatch.setattr(modeling_utils, "safe_save_file", written)
    assert snapshot(target) == before

    def failing_extra(directory):
        (directory / "trainer_state.json").write_text("{}")
        raise OSError("disk full")

    if "router" not in save or save["router"] == "dominant":  # the fitted rows take a while: fitted once
        with pytest.raises(OSError, match="disk full"):
            mf.save_pretrained(model, target, extra=failing_extra, **save)
    assert snapshot(target) == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_refused_standard_export_leaves_an_existing_checkpoint_untouched(tmp_path):
    model, _ = merged_mixtral(tmp_path)
    target = tmp_path / "ckpt"
    mf.save_pretrained(model, target, format="standard", router="dominant")
    before = snapshot(target)
    with pytest.raises(ValueError, match="router='fitted' needs calibration batches"):
        mf.save_pretrained(model, target, format="standard", router="fitted")
    names = [layer.name for layer in mf.moe_layers(model)]
    other = build("mixtral", tmp_path)
    mf.merge_experts(other, mf.collect_routing_stats(other, calibration(other, batches=1), progress=False),
                     {names[0]: 4, names[1]: 3}, globally=False, progress=False)
    with pytest.raises(ValueError, match="different numbers of experts"):
        mf.save_pretrained(other, target, format="standard", router="dominant")
    assert snapshot(target) == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_standard_export_into_the_directory_the_model_was_loaded_from(tmp_path):
    """The source checkpoint is replaced only once the new one is complete: the loaded model keeps computing the
    same, and the directory then holds the M-expert checkpoint that plain transformers loads."""
    model, batches = merged_mixtral(tmp_path)
    source = tmp_path / "mixtral-base"
    before = forward(model, batches[0])
    standard = to_standard(model, router="dominant")
    mf.save_pretrained(model, source, format="standard", router="dominant")
    assert torch.equal(forward(model, batches[0]), before)
    plain = load_model(str(source))
    assert plain.config.num_local_experts == 4
    torch.testing.assert_close(forward(plain, batches[0]), forward(standard, batches[0]), rtol=1e-5, atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
