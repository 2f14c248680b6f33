"""`mcsmoe-fast` options whose effect the end-to-end CLI tests do not see: merge --globally/--no-globally,
--strategy, --no-permute, --split/--text-field on a dataset; permute --reference; the demo subcommand."""
import re

import pytest
import torch

from mcsmoe_fast import align_experts, collect_routing_stats, from_pretrained, moe_layers
from mcsmoe_fast.calibration_data import calibration_batches, read_calibration_texts
from mcsmoe_fast.drop import logit_mask
from mcsmoe_fast.grouping import group_counts
from mcsmoe_fast.models.hub import load_model
from test_calibration_data import SPLITS, local_dataset  # noqa: F401  (fixture)
from test_cli_merge import LINES, run, tiny_tokenizer, workspace  # noqa: F401  (fixture)


def merge_mixtral(workspace, capsys, out, *options):
    rc, stdout, err = run(["merge", "--model", workspace / "mixtral", "--calib", workspace / "calib.txt",
                           "--out", workspace / out, *options], capsys)
    assert rc == 0, err
    return from_pretrained(workspace / out), stdout


def cli_stats(workspace):
    """The routing statistics the CLI collects by default (same text, tokenizer and batching)."""
    model = load_model(str(workspace / "mixtral"))
    texts = read_calibration_texts(str(workspace / "calib.txt"))
    return model, collect_routing_stats(model, calibration_batches(texts, tiny_tokenizer()), progress=False)


def slot_counts(model):
    return {layer.name: layer.module.experts.num_slots for layer in moe_layers(model)}


def test_globally_spreads_the_budget_by_usage_and_no_globally_gives_every_layer_the_same(workspace, capsys):
    _, stats = cli_stats(workspace)
    usage = group_counts({n: s.frequency for n, s in stats.items()}, 3, globally=True)
    assert len(set(usage.values())) > 1, "the test model's layers must differ in usage"  # here {4, 2}
    merged, out = merge_mixtral(workspace, capsys, "global", "--num-groups", 3, "--no-permute", "--globally")
    assert slot_counts(merged) == usage
    assert merged.config.mcsmoe_merge["merges"][-1]["method"]["globally"] is True
    merged, out = merge_mixtral(workspace, capsys, "per-layer", "--num-groups", 3, "--no-permute", "--no-globally")
    assert slot_counts(merged) == dict.fromkeys(stats, 3)
    assert merged.config.mcsmoe_merge["merges"][-1]["method"]["globally"] is False
    assert "6 groups over 2 layers" in out


def test_strategy_average_and_frequency_merge_to_their_weighted_averages(workspace, capsys):
    """--no-permute: each slot is the plain (average) or usage-frequency-weighted (frequency) average of
    its members' original weights; the two strategies give different slots."""
    original, stats = cli_stats(workspace)
    slots = {}
    for strategy in ("average", "frequency"):
        merged, _ = merge_mixtral(workspace, capsys, strategy, "--num-groups", 3, "--no-globally", "--no-permute",
                                  "--strategy", strategy)
        section = merged.config.mcsmoe_merge["merges"][-1]
        assert section["method"]["strategy"] == strategy and section["method"]["permute"] is False
        for layer, plain in zip(moe_layers(merged), moe_layers(original)):
            w_in, w_out = (w.detach().double() for w in plain.expert_weights())
            counts = stats[layer.name].counts
            experts = layer.module.experts
            groups = section["layers"][layer.name]["groups"]
            assert len(groups) == 3 and any(len(g) > 1 for g in groups)
            for slot, group in enumerate(groups):
                weights = (torch.full((len(group),), 1 / len(group), dtype=torch.float64) if strategy == "average"
                           else counts[group] / counts[group].sum())
                expected_in = torch.einsum("g,gfd->fd", weights, w_in[group])
                expected_out = torch.einsum("g,gdf->df", weights, w_out[group])
                torch.testing.assert_close(experts.w_in[slot].double(), expected_in, rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(experts.w_out[slot].double(), expected_out, rtol=1e-5, atol=1e-6)
            slots[strategy, layer.name] = experts.w_in.detach().clone()
    for layer in moe_layers(original):
        assert not torch.allclose(slots["average", layer.name], slots["frequency", layer.name])


def test_strategy_drop_keeps_dominant_experts_and_masks_the_router(workspace, capsys):
    original, stats = cli_stats(workspace)
    merged, _ = merge_mixtral(workspace, capsys, "drop", "--num-groups", 3, "--no-globally", "--strategy", "drop")
    section = merged.config.mcsmoe_merge["merges"][-1]
    for layer, plain in zip(moe_layers(merged), moe_layers(original)):
        dominant = section["layers"][layer.name]["dominant"]
        assert dominant == sorted(stats[layer.name].counts.argsort(descending=True, stable=True)[:3].tolist())
        keep = logit_mask(layer)
        assert keep is not None and keep.nonzero().flatten().tolist() == dominant
        w_in, w_out = plain.expert_weights()
        assert torch.equal(layer.module.experts.w_in, w_in[dominant])  # kept as they were, not averaged
        assert torch.equal(layer.module.experts.w_out, w_out[dominant])


def test_merge_reads_the_given_split_and_text_field_of_a_dataset(workspace, capsys, local_dataset):  # noqa: F811
    rc, out, err = run(["merge", "--model", workspace / "mixtral", "--calib", "local/calib", "--split", "validation",
                        "--text-field", "sentence", "--num-groups", 2, "--out", workspace / "from-dataset"], capsys)
    assert rc == 0, err
    assert local_dataset == [("local/calib", None, "validation")]
    assert "3 calibration samples" in out  # the validation split's three non-empty sentences
    rc, out, err = run(["merge", "--model", workspace / "mixtral", "--calib", "local/calib", "--text-field",
                        "sentence", "--num-groups", 2, "--out", workspace / "from-train"], capsys)
    assert rc == 0, err
    assert local_dataset[-1] == ("local/calib", None, "train") and f"{len(SPLITS['train'])} calibration samples" in out
    rc, _, err = run(["merge", "--model", workspace / "mixtral", "--calib", "local/calib", "--split", "validation",
                      "--num-groups", 2, "--out", workspace / "x"], capsys)  # default text field "text": none
    assert rc == 2 and "no column 'text'" in err


def test_permute_reference_aligns_every_expert_to_that_expert(workspace, capsys):
    rc, out, err = run(["permute", "--model", workspace / "mixtral", "--reference", 3,
                        "--out", workspace / "aligned3"], capsys)
    assert rc == 0, err
    original = load_model(str(workspace / "mixtral"))
    aligned = load_model(str(workspace / "aligned3"))
    expected = load_model(str(workspace / "mixtral"))
    align_experts(expected, reference=3, progress=False)
    for a, o, e in zip(moe_layers(aligned), moe_layers(original), moe_layers(expected)):
        w_in, w_out = a.expert_weights()
        assert torch.equal(w_in[3], o.expert_weights()[0][3]) and torch.equal(w_out[3], o.expert_weights()[1][3])
        assert not torch.equal(w_in[0], o.expert_weights()[0][0])  # expert 0 is aligned, not the reference
        assert torch.equal(w_in, e.expert_weights()[0]) and torch.equal(w_out, e.expert_weights()[1])
    for line in out.splitlines():
        if "neurons moved" in line:  # expert 3 stays: at most 7 of 8 experts' neurons move
            moved, total = map(int, re.search(r"(\d+) of (\d+) neurons moved", line).groups())
            assert 0 < moved <= total * 7 // 8
    rc, _, err = run(["permute", "--model", workspace / "mixtral", "--reference", 8, "--out", workspace / "x"], capsys)
    assert rc == 2 and "out of range" in err


def test_demo_subcommand_runs_the_pipeline(capsys, monkeypatch):
    """`mcsmoe-fast demo` through the CLI entry point (smaller models than the default, for speed)."""
    import mcsmoe_fast.demo.tour as demo
    from mcsmoe_fast.cli import main
    from mcsmoe_fast.tiny import tiny_mixtral, tiny_switch

    monkeypatch.setattr(demo, "BUILDERS", {"switch": lambda: tiny_switch(num_layers=2),
                                           "mixtral": lambda: tiny_mixtral(num_layers=1)})
    assert main(["demo", "--tour"]) == 0
    out = capsys.readouterr().out
    assert "switch: 2 MoE layers, 8 experts each, activation relu" in out
    assert "mixtral: 1 MoE layers, 8 experts each, activation swiglu" in out
    changes = [float(x) for x in re.findall(r"max output change (\S+) \(function preserved\)", out)]
    assert len(changes) == 2 and max(changes) <= 1e-4
    assert re.findall(r"8 experts -> groups per layer \[([\d, ]+)\]", out) == ["2, 2", "2"]
    sizes = re.findall(r"checkpoint (\S+) MB -> (\S+) MB", out)
    assert len(sizes) == 2 and all(float(after) < float(before) for before, after in sizes)
    differences = [float(x) for x in re.findall(r"max difference to the merged model (\S+)", out)]
    assert len(differences) == 2 and max(differences) <= 1e-5


def test_merge_streams_when_the_model_does_not_fit_max_memory(workspace, capsys):
    """--max-memory below the in-memory pipeline's need: the merge runs layer by layer from the shards and
    gives the same checkpoint (groups and outputs) as the in-memory merge."""
    sharded = workspace / "sharded"
    load_model(str(workspace / "mixtral")).save_pretrained(sharded, max_shard_size="50KB")
    tiny_tokenizer().save_pretrained(sharded)
    assert len(list(sharded.glob("*.safetensors"))) > 1
    common = ["--calib", workspace / "calib.txt", "--num-groups", 2]
    rc, out, err = run(["merge", "--model", sharded, *common, "--out", workspace / "streamed", "--max-memory", "100KB",
                        "--offload-dir", workspace / "acts"], capsys)
    assert rc == 0, err
    assert "layer by layer" in out
    rc, out, err = run(["merge", "--model", sharded, *common, "--out", workspace / "in-memory"], capsys)
    assert rc == 0, err
    assert "layer by layer" not in out
    streamed, in_memory = from_pretrained(workspace / "streamed"), from_pretrained(workspace / "in-memory")
    assert [layer.expert_map().tolist() for layer in moe_layers(streamed)] == \
        [layer.expert_map().tolist() for layer in moe_layers(in_memory)]
    ids = torch.randint(3, 40, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(streamed(input_ids=ids).logits, in_memory(input_ids=ids).logits, atol=1e-5, rtol=0)


def test_permute_streams_when_the_model_does_not_fit_max_memory(workspace, capsys):
    """permute --max-memory below the model's need: aligned layer by layer from the shards, the same plain
    transformers checkpoint (every tensor) as the in-memory alignment, and the tokenizer beside it."""
    sharded = workspace / "sharded"
    load_model(str(workspace / "mixtral")).save_pretrained(sharded, max_shard_size="50KB")
    tiny_tokenizer().save_pretrained(sharded)
    rc, out, err = run(["permute", "--model", sharded, "--out", workspace / "streamed", "--max-memory", "100KB",
                        "--reference", 3], capsys)
    assert rc == 0, err
    assert "layer by layer" in out
    rc, out, err = run(["permute", "--model", sharded, "--out", workspace / "in-memory", "--reference", 3], capsys)
    assert rc == 0, err
    assert "layer by layer" not in out
    streamed, in_memory = load_model(str(workspace / "streamed")), load_model(str(workspace / "in-memory"))
    a, b = streamed.state_dict(), in_memory.state_dict()
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert (workspace / "streamed" / "tokenizer.json").is_file()
    assert (workspace / "streamed" / "model.safetensors").is_file()  # shards of max_memory / 8, at least 1 MB


def test_compress_streams_when_the_model_does_not_fit_max_memory(workspace, capsys):
    """compress --max-memory on a merged checkpoint that would not fit: compressed layer by layer from its
    shards, the same checkpoint as the in-memory compression."""
    rc, out, err = run(["merge", "--model", workspace / "mixtral", "--calib", workspace / "calib.txt",
                        "--num-groups", 2, "--out", workspace / "merged"], capsys)
    assert rc == 0, err
    common = ["--model", workspace / "merged", "--rank", 4, "--keep-ratio", 0.3]
    rc, out, err = run(["compress", *common, "--out", workspace / "streamed", "--max-memory", "100KB"], capsys)
    assert rc == 0, err
    assert "layer by layer" in out
    rc, out, err = run(["compress", *common, "--out", workspace / "in-memory"], capsys)
    assert rc == 0, err
    assert "layer by layer" not in out
    a, b = from_pretrained(workspace / "streamed").state_dict(), from_pretrained(workspace / "in-memory").state_dict()
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert (workspace / "streamed" / "tokenizer.json").is_file()
    rc, out, err = run(["compress", *common, "--out", workspace / "x", "--max-memory", "100KB", "--importance",
                        "activation", "--calib", workspace / "calib.txt"], capsys)
    assert rc != 0 and "--importance weight" in err


@pytest.mark.parametrize("streamed", [False, True], ids=["in-memory", "streamed"])
def test_dtype_option_sets_what_merge_and_permute_load_and_save(workspace, capsys, streamed):
    """--dtype auto keeps a bfloat16 checkpoint in bfloat16 (half the output of the float32 default); the
    streamed merge equals the in-memory one in that dtype too."""
    from safetensors import safe_open

    from mcsmoe_fast.tiny import tiny_mixtral

    src = workspace / "mixtral-bf16"
    tiny_mixtral().to(torch.bfloat16).save_pretrained(src)
    tiny_tokenizer().save_pretrained(src)
    budget = ["--max-memory", "1KB"] if streamed else []

    def float_dtypes(path):
        dtypes = set()
        for f in path.glob("*.safetensors"):
            with safe_open(str(f), "pt") as h:
                dtypes |= {h.get_tensor(k).dtype for k in h.keys() if h.get_tensor(k).is_floating_point()}
        return dtypes

    for dtype, expected in (("auto", torch.bfloat16), ("float32", torch.float32), ("float16", torch.float16)):
        for command, extra in (("merge", ["--calib", workspace / "calib.txt", "--num-groups", 3]), ("permute", [])):
            out = workspace / f"{command}-{dtype}-{streamed}"
            rc, _, err = run([command, "--model", src, "--out", out, "--dtype", dtype, *extra, *budget], capsys)
            assert rc == 0, err
            assert float_dtypes(out) == {expected}, (command, dtype)
    if streamed:  # the same tensors as the in-memory merge in bfloat16
        run(["merge", "--model", src, "--calib", workspace / "calib.txt", "--num-groups", 3, "--dtype", "auto",
             "--out", workspace / "in-memory"], capsys)
        a, b = (from_pretrained(workspace / p).state_dict() for p in ("in-memory", "merge-auto-True"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
