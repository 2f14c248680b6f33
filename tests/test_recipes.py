"""The recipes in python/ run end to end on tiny local models (no network)."""
import importlib.util
from pathlib import Path

from test_cli_merge import LINES, tiny_tokenizer

from mcsmoe_fast import from_pretrained, moe_layers
from mcsmoe_fast.modules import MoEExperts
from mcsmoe_fast.tiny import tiny_switch

RECIPES = Path(__file__).resolve().parent.parent / "python"


def load_recipe(name):
    spec = importlib.util.spec_from_file_location(name, RECIPES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_switch_base_32_recipe_keeps_the_first_encoder_layer(tmp_path, capsys):
    tiny_switch(num_experts=8, num_layers=4).save_pretrained(tmp_path / "model")
    tiny_tokenizer().save_pretrained(tmp_path / "model")
    (tmp_path / "calib.txt").write_text("\n".join(LINES * 3))
    recipe = load_recipe("switch_base_32_msmoe")
    rc = recipe.main(["--model", str(tmp_path / "model"), "--calib", str(tmp_path / "calib.txt"),
                      "--num-groups", "2", "--out", str(tmp_path / "merged"), "--", "--batch-size", "4"])
    assert rc == 0, capsys.readouterr().err
    layers = moe_layers(from_pretrained(tmp_path / "merged"))
    assert len(layers) == 4
    assert not isinstance(layers[0].module.experts, MoEExperts), "the first encoder MoE layer must stay unmerged"
    merged = [layer.module.experts for layer in layers[1:]]
    assert all(isinstance(e, MoEExperts) for e in merged)
    assert sum(e.num_slots for e in merged) == 2 * 3  # global budget: 2 groups x 3 merged layers
