"""`mcsmoe-fast merge --format standard [--router dominant|fitted]`: the family's own checkpoint with the merged
experts, loaded by plain transformers; the option checks that refuse before any work."""
import pytest
import torch

from mcsmoe_fast import moe_layers
from mcsmoe_fast.models.hub import load_model
from test_cli_merge import LINES, run, tiny_tokenizer, workspace  # noqa: F401  (fixture)


def merge(workspace, capsys, out, *options):
    return run(["merge", "--model", workspace / "mixtral", "--calib", workspace / "calib.txt", "--num-groups", 3,
                "--out", workspace / out, *options], capsys)


def test_format_standard_writes_a_plain_checkpoint_with_the_merged_count_and_each_router(workspace, capsys):
    original = load_model(str(workspace / "mixtral"))
    rows = {}
    for router in ("dominant", "fitted", None):
        out = f"standard-{router}"
        rc, stdout, err = merge(workspace, capsys, out, "--format", "standard", *(("--router", router) if router else ()))
        assert rc == 0, err
        assert "saved standard checkpoint" in stdout
        model = load_model(str(workspace / out))  # plain transformers, no mcsmoe_merge section
        assert model.config.num_local_experts == 3 and not hasattr(model.config, "mcsmoe_merge")
        assert model.config.mcsmoe_standard["router"] == (router or "fitted")
        assert (workspace / out / "tokenizer.json").exists()
        rows[router] = [layer.router_weight().detach().clone() for layer in moe_layers(model)]
        section = model.config.mcsmoe_standard["layers"]
        for layer, plain in zip(moe_layers(model), moe_layers(original)):
            dominant = section[layer.name]["router_rows"]
            same = torch.allclose(layer.router_weight(), plain.router_weight()[dominant])
            assert same == (router == "dominant")  # --globally is off by default with --format standard
    assert all(torch.equal(a, b) for a, b in zip(rows["fitted"], rows[None]))


@pytest.mark.parametrize("options, match", [
    (("--router", "dominant"), "--router chooses the router rows of --format standard"),
    (("--format", "standard", "--globally"), "--globally gives the layers different expert counts"),
    (("--format", "standard", "--export-dense"), "--export-dense writes every expert"),
    (("--format", "standard", "--layers", "0"), "--layers leaves some MoE layers"),
    (("--format", "standard", "--max-memory", "100KB", "--layers", "0"), "leaves the other MoE layers with all"),
    (("--format", "standard", "--max-memory", "100KB", "--router", "fitted", "--device-map", "auto"),
     "with a device_map writes router='dominant' rows only"),
])
def test_format_standard_refusals(workspace, capsys, options, match):
    rc, stdout, err = merge(workspace, capsys, "refused", *options)
    assert rc == 2 and match in err, err
    assert "groups over" not in stdout  # refused before merging
    assert not (workspace / "refused").exists()


def test_format_standard_merges_deepseek_within_its_routing_groups(workspace, capsys):
    """DeepSeek-V3 (2 routing groups of 4): --format standard merges within routing groups by default, so the
    export is accepted, 2 merged experts per routing group; --num-groups that does not split is refused first."""
    from mcsmoe_fast.tiny import tiny_moe, tiny_tokenizer as words_tokenizer

    tiny_moe("deepseek_v3").save_pretrained(workspace / "deepseek")
    words_tokenizer().save_pretrained(workspace / "deepseek")

    def merge_deepseek(out, groups, *options):
        return run(["merge", "--model", workspace / "deepseek", "--calib", workspace / "calib.txt", "--num-groups",
                    groups, "--out", workspace / out, "--format", "standard", "--router", "dominant", *options], capsys)

    rc, stdout, err = merge_deepseek("ds-standard", 4)
    assert rc == 0, err
    model = load_model(str(workspace / "ds-standard"))
    assert model.config.n_routed_experts == 4 and model.config.n_group == 2
    for entry in model.config.mcsmoe_standard["layers"].values():
        assert [{e // 4 for e in g} for g in entry["groups"]] == [{0}, {0}, {1}, {1}]
    rc, stdout, err = merge_deepseek("ds-refused", 3)
    assert rc == 2 and "group count (3) to be multiples of 2" in err, err
    assert "groups over" not in stdout and not (workspace / "ds-refused").exists()
