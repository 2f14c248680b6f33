"""The recipes in python/ run end to end on tiny local models and files (no network): every stage in the
summary, the checkpoints load back with the expected slots, and the summary's figures are those of the
saved checkpoints (re-evaluated here)."""
import importlib.util
import itertools
import json
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch

from mcsmoe_fast import from_pretrained, moe_layers
from mcsmoe_fast.modules.compressed import CompressedMoEExperts
from mcsmoe_fast.demo.measure import expert_parameters
from mcsmoe_fast.modules import MoEExperts
from mcsmoe_fast.tasks import evaluate_task, get_task, load_task_data
from mcsmoe_fast.tiny import TINY_WORDS, tiny_mixtral, tiny_switch, tiny_tokenizer
from mcsmoe_fast.train.text import perplexity, text_windows

RECIPES = Path(__file__).resolve().parent.parent / "python"
SST2_PROMPT = "Question: Was that sentence positive or negative? Answer:"
STAGES = ("finetuned", "merged", "msmoe", "mcsmoe")
NOUNS, GOOD, BAD = ("experts", "router", "model", "layer"), ("great", "fast", "good"), ("bad", "slow", "poor")
SST2_WORDS = " ".join((*NOUNS, *GOOD, *BAD, "the is positive negative", SST2_PROMPT))  # every word of the data


def load_recipe(name):
    spec = importlib.util.spec_from_file_location(name, RECIPES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a busy two-core machine two threads cost 5-10x.
    Module scope: set before the module-scoped recipe runs below."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def widen(model, std: float, seed: int):
    """Re-draw every matrix with a larger spread, so that merging and training visibly change the outputs."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, std)
    return model


def saved_method(checkpoint, step: str) -> dict:
    """How a saved checkpoint was merged (its first merge) or compressed, as its config.json records it."""
    config = json.loads((Path(checkpoint) / "config.json").read_text())
    return config["mcsmoe_merge"]["merges"][0]["method"] if step == "merge" else config["mcsmoe_compress"]["method"]


def sst2_rows(pairs):
    return "\n".join(json.dumps({"sentence": f"the {noun} is {adj}", "label": int(adj in GOOD), "idx": i})
                     for i, (noun, adj) in enumerate(pairs))


def run_switch(space, out, *extra, model="model", steps=(8, 4, 6)) -> int:
    recipe = load_recipe("switch_base_32_mcsmoe")
    return recipe.main(["--model", space / model, "--task", "SST-2", "--data-dir", space / "data", "--out", space / out,
                        "--finetune-steps", steps[0], "--merge-steps", steps[1], "--compress-steps", steps[2],
                        "--batch-size", 4, "--lr", 3e-3, "--eval-every", 4, "--num-groups", 2, "--rank", 4,
                        "--keep-ratio", 0.25, "--quiet", *extra])


@pytest.fixture(scope="module")
def switch_run(tmp_path_factory):
    """One run of the switch-base-32 recipe on a tiny Switch model and a local SST-2 in the hub's columns."""
    space = tmp_path_factory.mktemp("switch")
    pairs = list(itertools.product(NOUNS, GOOD + BAD))
    (space / "data").mkdir()
    (space / "data" / "train.jsonl").write_text(sst2_rows(pairs[::2] + pairs[1::4]))
    (space / "data" / "validation.jsonl").write_text(sst2_rows(pairs))
    widen(tiny_switch(), 0.2, seed=1).save_pretrained(space / "model")
    tiny_tokenizer(SST2_WORDS).save_pretrained(space / "model")
    assert run_switch(space, "run") == 0
    return space, json.loads((space / "run" / "summary.json").read_text())


def test_switch_recipe_reports_every_stage_next_to_the_finetuned_model(switch_run):
    space, summary = switch_run
    assert summary["task"] == "sst2" and summary["metric"] == "accuracy"
    assert summary["paper_finetuned"] == "accuracy 95.75"
    assert list(summary["stages"]) == list(STAGES)
    finetuned = summary["stages"]["finetuned"]["metrics"]["accuracy"]
    for stage in summary["stages"].values():
        assert set(stage["metrics"]) == {"accuracy"} and 0.0 <= stage["metrics"]["accuracy"] <= 1.0
        assert stage["vs_finetuned"]["accuracy"] == pytest.approx(stage["metrics"]["accuracy"] - finetuned)
    assert [summary["stages"][s]["steps"] for s in STAGES] == [8, 0, 4, 6]
    params = [summary["stages"][s]["expert_parameters"] for s in STAGES]
    assert params[0] > params[1] == params[2] > params[3]


def test_switch_recipe_keeps_the_first_encoder_layer_and_merges_the_rest(switch_run):
    space, summary = switch_run
    names = [layer.name for layer in moe_layers(tiny_switch())]
    assert summary["settings"]["merged_layers"] == names[1:] and names[0].startswith("encoder.")
    kinds = {"merged": MoEExperts, "msmoe": MoEExperts, "mcsmoe": CompressedMoEExperts}
    maps = {}
    for stage in STAGES[1:]:
        layers = moe_layers(from_pretrained(summary["stages"][stage]["checkpoint"]))
        first = layers[0].module.experts
        assert not isinstance(first, (MoEExperts, CompressedMoEExperts)), f"{stage}: the first encoder layer merged"
        assert all(type(layer.module.experts) is kinds[stage] for layer in layers[1:]), stage
        assert sum(layer.module.experts.num_slots for layer in layers[1:]) == 2 * 3  # 2 groups x 3 layers
        maps[stage] = [layer.expert_map().tolist() for layer in layers[1:]]
        if stage == "mcsmoe":
            assert not any(layer.module.experts.pruning for layer in layers[1:])  # saved finalized
    assert all(m == maps["merged"] for m in maps.values())  # KD and compression keep the groups
    assert saved_method(summary["stages"]["merged"]["checkpoint"], "merge") == {
        "num_groups": 2, "similarity": "router-logits", "globally": True, "permute": True, "strategy": "frequency",
        "grouping": "dominant", "seed": 0}  # the paper's M-SMoE
    assert saved_method(summary["stages"]["mcsmoe"]["checkpoint"], "compress") == {
        "rank": 4, "keep_ratio": 0.25, "importance": "gradient", "svd": "auto"}  # pruned during KD
    assert [len(set(m)) for m in maps["merged"]] == list(summary["settings"]["groups_per_layer"].values())


def test_switch_recipe_metrics_are_those_of_the_saved_checkpoints(switch_run):
    space, summary = switch_run
    task = get_task("sst2")
    examples = load_task_data(task, path=space / "data" / "validation.jsonl")
    tokenizer = tiny_tokenizer(SST2_WORDS)
    seen = []
    for name in STAGES:
        stage = summary["stages"][name]
        model = from_pretrained(stage["checkpoint"])
        assert evaluate_task(model, tokenizer, task, examples, progress=False) == stage["metrics"], name
        assert expert_parameters(model) == stage["expert_parameters"], name
        seen.append(stage["metrics"]["accuracy"])
    assert len(set(seen)) > 1, f"every stage scored {seen}: the comparison above tells them apart only if they differ"
    assert Path(summary["stages"]["finetuned"]["checkpoint"]) == space / "run" / "finetune" / "best"


def test_switch_recipe_resumes_a_finished_run_to_the_same_results(switch_run):
    space, summary = switch_run
    shutil.copytree(space / "run", space / "resumed")
    assert run_switch(space, "resumed", "--resume") == 0
    again = json.loads((space / "resumed" / "summary.json").read_text())
    metrics = lambda s: {name: stage["metrics"] for name, stage in s["stages"].items()}  # noqa: E731
    assert metrics(again) == metrics(summary)
    for run_dir, steps in (("finetune", 8), ("msmoe", 4), ("mcsmoe", 6)):  # no stage trained further
        state = json.loads((space / "resumed" / run_dir / "latest" / "trainer_state.json").read_text())
        assert state["step"] == steps


def test_switch_recipe_takes_a_finetuned_model_with_zero_finetune_steps(switch_run):
    space, summary = switch_run
    assert run_switch(space, "from-finetuned", model="run/finetune/best", steps=(0, 2, 2)) == 0
    again = json.loads((space / "from-finetuned" / "summary.json").read_text())
    assert again["stages"]["finetuned"]["checkpoint"] == str(space / "run" / "finetune" / "best")
    assert again["stages"]["finetuned"]["steps"] == 0
    assert not (space / "from-finetuned" / "finetune").exists()
    for stage in ("finetuned", "merged"):  # the same model, calibration and data: the same figures
        assert again["stages"][stage]["metrics"] == summary["stages"][stage]["metrics"], stage
    assert again["settings"]["groups_per_layer"] == summary["settings"]["groups_per_layer"]


def test_switch_recipe_refuses_a_data_dir_without_a_validation_file(tmp_path, capsys):
    (tmp_path / "train.jsonl").write_text(sst2_rows([("model", "good")]))
    recipe = load_recipe("switch_base_32_mcsmoe")
    rc = recipe.main(["--model", tmp_path, "--task", "sst2", "--data-dir", tmp_path, "--out", tmp_path / "o"])
    assert rc == 2
    assert "no validation file (validation.jsonl" in capsys.readouterr().err


@pytest.fixture(scope="module")
def mixtral_space(tmp_path_factory):
    space = tmp_path_factory.mktemp("mixtral")
    widen(tiny_mixtral(), 0.3, seed=1).save_pretrained(space / "model")
    tiny_tokenizer().save_pretrained(space / "model")
    words = TINY_WORDS.split()
    (space / "calib.txt").write_text("\n".join(" ".join(words[(i * 7 + j) % len(words)] for j in range(12))
                                               for i in range(24)))
    (space / "heldout.txt").write_text(" ".join(words[(i * 5) % len(words)] for i in range(400)))
    return space


def run_mixtral(space, out, *extra):
    recipe = load_recipe("mixtral_one_shot")
    rc = recipe.main(["--model", space / "model", "--calib", space / "calib.txt", "--eval-text", space / "heldout.txt",
                      "--length", 32, "--rank", 4, "--keep-ratio", 0.25, "--out", space / out, "--quiet", *extra])
    assert rc == 0
    return json.loads((space / out / "summary.json").read_text())


def test_mixtral_recipe_merges_8_to_4_then_compresses_and_reports_perplexity(mixtral_space, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # not installed, even where it is
    summary = run_mixtral(mixtral_space, "run", "--lm-eval-tasks", "arc_easy")
    assert "lm-eval-harness is not installed: skipping" in capsys.readouterr().out
    assert list(summary["stages"]) == ["full", "merged", "mcsmoe"]
    assert summary["settings"]["groups_per_layer"] == {"model.layers.0.mlp": 4, "model.layers.1.mlp": 4}
    tokenizer = tiny_tokenizer()
    windows = text_windows(mixtral_space / "heldout.txt", tokenizer, 32).rows
    full = summary["stages"]["full"]
    assert full["checkpoint"] is None and full["perplexity_vs_full"] == 1.0
    assert summary["settings"]["lm_eval"] == "skipped: lm-eval is not installed"
    assert not any("lm_eval" in stage for stage in summary["stages"].values())
    assert perplexity(from_pretrained(mixtral_space / "model"), windows) == pytest.approx(full["perplexity"], rel=1e-6)
    for stage, kind in (("merged", MoEExperts), ("mcsmoe", CompressedMoEExperts)):
        entry = summary["stages"][stage]
        model = from_pretrained(entry["checkpoint"])
        layers = moe_layers(model)
        assert all(type(layer.module.experts) is kind and layer.module.experts.num_slots == 4 for layer in layers)
        assert perplexity(model, windows) == pytest.approx(entry["perplexity"], rel=1e-6), stage
        assert entry["perplexity_vs_full"] == pytest.approx(entry["perplexity"] / full["perplexity"])
        assert entry["expert_parameters"] == expert_parameters(model) < full["expert_parameters"]
    assert saved_method(summary["stages"]["merged"]["checkpoint"], "merge") == {
        "num_groups": 4, "similarity": "router-logits", "globally": False, "permute": True, "strategy": "frequency",
        "grouping": "dominant", "seed": 0}
    assert saved_method(summary["stages"]["mcsmoe"]["checkpoint"], "compress") == {
        "rank": 4, "keep_ratio": 0.25, "importance": "activation", "svd": "auto"}
    assert len({summary["stages"][s]["perplexity"] for s in summary["stages"]}) == 3


def test_mixtral_recipe_runs_lm_eval_tasks_when_lm_eval_is_installed(mixtral_space, monkeypatch):
    calls = []

    class HFLM:
        def __init__(self, pretrained, tokenizer, batch_size):
            self.model = pretrained

    def simple_evaluate(model, tasks, num_fewshot, limit):
        calls.append((type(model.model.model.layers[0].mlp.experts).__name__, tasks, num_fewshot, limit))
        return {"results": {"arc_easy": {"alias": "arc_easy", "acc,none": 0.25 * len(calls), "acc_stderr,none": 0.1}}}

    lm_eval = types.ModuleType("lm_eval")
    lm_eval.simple_evaluate = simple_evaluate
    models = types.ModuleType("lm_eval.models")
    huggingface = types.ModuleType("lm_eval.models.huggingface")
    huggingface.HFLM = HFLM
    monkeypatch.setitem(sys.modules, "lm_eval", lm_eval)
    monkeypatch.setitem(sys.modules, "lm_eval.models", models)
    monkeypatch.setitem(sys.modules, "lm_eval.models.huggingface", huggingface)
    summary = run_mixtral(mixtral_space, "lm", "--no-compress", "--lm-eval-tasks", "arc_easy",
                          "--lm-eval-fewshot", 5, "--lm-eval-limit", 10)
    assert list(summary["stages"]) == ["full", "merged"]  # --no-compress stops after merging
    assert summary["settings"]["lm_eval"] is None
    assert not (mixtral_space / "lm" / "mcsmoe").exists()
    assert [c[0] for c in calls] == ["MixtralExperts", "MoEExperts"]
    assert all(c[1:] == (["arc_easy"], 5, 10) for c in calls)
    assert summary["stages"]["full"]["lm_eval"] == {"arc_easy/acc": 0.25}
    assert summary["stages"]["merged"]["lm_eval"] == {"arc_easy/acc": 0.5}
