"""`compare` in memory and larger than memory (compare.py, compare_streamed.py, cli/compare.py) and what they plan
with (streaming/memory.py, the streamed perplexity and pruning): the in-memory estimate counts the models the
comparison holds at once, what cannot run is refused before any work in both paths, group-limited routers give the
same rows in both, and the table shows what was removed."""
from __future__ import annotations

import gc
import math
import warnings

import pytest
import torch
from transformers import PreTrainedModel

import mcsmoe_fast.calibration_data as calibration_data
import mcsmoe_fast.compare as compare
import mcsmoe_fast.compare_streamed as compare_streamed
import mcsmoe_fast.streaming.perplexity as streamed_ppl
import mcsmoe_fast.streaming.prune as streamed_prune
from mcsmoe_fast import collect_routing_stats, merge_experts, save_pretrained
from mcsmoe_fast.cli import main
from mcsmoe_fast.loading import open_model
from mcsmoe_fast.streaming import checkpoint_bytes, fits_in_memory, in_memory_bytes
from mcsmoe_fast.tiny import TINY_WORDS, tiny_mixtral, tiny_moe, tiny_tokenizer
from merge_helpers import calibration


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare-fidelity")
    tiny_mixtral(seed=3).save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    (root / "calib.txt").write_text((TINY_WORDS + "\n") * 12)
    return root


def _cli(source, out, *extra):
    return main([str(a) for a in ["compare", "--model", source / "model", "--calib", source / "calib.txt",
                                  "--eval-text", source / "calib.txt", "--eval-length", 8, "--out", out, *extra]])


def _no_data(monkeypatch):
    """The tokenizer is the first data the CLI reads: a refusal "before any work" comes before it."""
    def fail(*args, **kwargs):
        raise AssertionError("the tokenizer was read before the refusal")
    monkeypatch.setattr(calibration_data, "load_tokenizer", fail)


def _no_passes(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("a streamed pass ran before the refusal")
    for name in ("streamed_perplexity", "merge_checkpoint", "prune_checkpoint"):
        monkeypatch.setattr(compare_streamed, name, fail)


def _live_parameter_bytes() -> int:
    """Bytes of the distinct parameter storages of every model alive now."""
    gc.collect()
    seen = {}
    with warnings.catch_warnings():  # isinstance on some of gc's objects warns of deprecated names
        warnings.simplefilter("ignore")
        models = [obj for obj in gc.get_objects() if isinstance(obj, PreTrainedModel)]
    for model in models:
        for p in model.parameters():
            storage = p.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


# --- 1. the in-memory comparison's estimate ---------------------------------------------------------------------
class _InMemory(Exception):
    pass


class _Streamed(Exception):
    pass


def _in_memory(*args, **kwargs):
    raise _InMemory


def _streamed(*args, **kwargs):
    raise _Streamed


def test_compare_estimate_counts_the_models_it_holds(source, tmp_path, monkeypatch):
    """The parameters alive while compare_methods evaluates its rows, plus the checkpoint's mapped pages, exceed a
    budget: then `compare --max-memory` must compare layer by layer."""
    methods = ["m-smoe", "hc-smoe", "m-smoe-standard"]
    model = open_model(str(source / "model"))
    batches = calibration(model, seed=5, batches=2, batch=2, length=7)
    windows = calibration(model, seed=6, batches=1, batch=3, length=10, pad=False)[0]["input_ids"]
    peak, real = [0], compare.perplexity

    def measured(reduced, w):  # each row's models are all made when it is evaluated
        peak[0] = max(peak[0], _live_parameter_bytes())
        return real(reduced, w)

    monkeypatch.setattr(compare, "perplexity", measured)
    compare.compare_methods(model, batches, windows, methods, (0.25,), progress=False)
    del model
    monkeypatch.setattr(compare, "perplexity", real)
    need = checkpoint_bytes(source / "model", None)[0] + peak[0]
    assert peak[0] > 2 * checkpoint_bytes(source / "model")[0]  # the model and more than one reduced copy

    monkeypatch.setattr(compare, "compare_methods", _in_memory)
    monkeypatch.setattr(compare_streamed, "compare_checkpoint", _streamed)
    args = ["--methods", ",".join(methods), "--ratios", "0.25", "--max-memory"]
    with pytest.raises(_Streamed):
        _cli(source, tmp_path / "out", *args, need - 1)
    with pytest.raises(_InMemory):  # a budget that holds every copy compares in memory
        _cli(source, tmp_path / "out", *args, 10 * need)


# --- 2. compare larger than memory refuses before any work ---------------------------------------------------------
@pytest.mark.parametrize("experts,methods,ratio,message", [
    (8, ["m-smoe", "reap"], 0.9, "fewer than the top_k=2"),
    (40, ["ream"], 0.95, "REAM groups of at most 16"),
])
def test_streamed_compare_refuses_what_the_in_memory_one_refuses(tmp_path, monkeypatch, experts, methods, ratio,
                                                                 message):
    model = tiny_mixtral(num_experts=experts, seed=3)
    model.save_pretrained(tmp_path / "model")
    batches = calibration(model, seed=5, batches=1, batch=2, length=7)
    windows = batches[0]["input_ids"]
    with pytest.raises(ValueError, match=message):
        compare.compare_methods(model, batches, windows, methods, [ratio], progress=False)
    _no_passes(monkeypatch)
    with pytest.raises(ValueError, match=message):
        compare_streamed.compare_checkpoint(tmp_path / "model", batches, windows, methods, [ratio],
                                            scratch=tmp_path / "s", max_memory="1KB", progress=False)


def test_streamed_compare_refuses_a_merged_checkpoint_before_any_work(tmp_path, monkeypatch):
    model = tiny_mixtral(seed=3)
    batches = calibration(model, seed=5, batches=1, batch=2, length=7)
    merge_experts(model, collect_routing_stats(model, batches, progress=False), 6, progress=False)
    save_pretrained(model, tmp_path / "merged")
    _no_passes(monkeypatch)
    with pytest.raises(ValueError, match="merged or compressed mcsmoe-fast checkpoint; compare the original model"):
        compare_streamed.compare_checkpoint(tmp_path / "merged", batches, batches[0]["input_ids"], ["m-smoe"],
                                            [0.5], scratch=tmp_path / "s", max_memory="1KB", progress=False)


# --- 3. group-limited routing: both paths the same ------------------------------------------------------------------
@pytest.fixture(scope="module")
def deepseek(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare-deepseek")
    model = tiny_moe("deepseek_v3", seed=3, initializer_range=0.3)
    assert model.config.n_group == 2 and model.config.topk_group == 1
    model.save_pretrained(root / "model")
    return root, model


def test_group_limited_routing_gives_the_same_rows_in_both_paths(deepseek, tmp_path):
    root, model = deepseek
    batches = calibration(model, seed=5, batches=2, batch=2, length=9)
    windows = calibration(model, seed=6, batches=1, batch=4, length=12, pad=False)[0]["input_ids"]
    methods = ["m-smoe", "m-smoe-standard", "hc-smoe-standard", "ream"]
    want = compare.compare_methods(model, batches, windows, methods, (0.5,), progress=False)
    got = compare_streamed.compare_checkpoint(root / "model", batches, windows, methods, (0.5,), scratch=tmp_path,
                                              max_memory="1KB", progress=False)
    key = [(r["method"], r["experts"], r["expert_params"], r["form"]) for r in want["rows"]]
    assert [(r["method"], r["experts"], r["expert_params"], r["form"]) for r in got["rows"]] == key
    for g, w in zip(got["rows"], want["rows"]):
        assert g["perplexity"] == pytest.approx(w["perplexity"], rel=1e-5), g["method"]
    standard = {r["method"]: r["perplexity"] for r in want["rows"]}
    assert standard["m-smoe-standard"] != standard["m-smoe"]  # a merge within routing groups, not the exact one


def test_group_limited_routing_refuses_uneven_counts_the_same_way(deepseek, tmp_path, monkeypatch):
    root, model = deepseek
    batches = calibration(model, seed=5, batches=1, batch=2, length=9)
    windows = batches[0]["input_ids"]
    with pytest.raises(ValueError) as in_memory:  # 5 kept experts do not split into 2 routing groups
        compare.compare_methods(model, batches, windows, ["m-smoe", "m-smoe-standard"], (0.375,), progress=False)
    _no_passes(monkeypatch)
    with pytest.raises(ValueError) as streamed:
        compare_streamed.compare_checkpoint(root / "model", batches, windows, ["m-smoe", "m-smoe-standard"], (0.375,),
                                            scratch=tmp_path, max_memory="1KB", progress=False)
    assert str(in_memory.value) == str(streamed.value) and "n_group=2" in str(in_memory.value)


# --- 4. the streamed perplexity and pruning plan with the largest layer ---------------------------------------------
BUDGET = 1_500_000  # below one decoder layer (1.57 MB in float32) and the hidden states


def _largest_layer_bytes(model) -> int:
    return max(sum(t.numel() for t in layer.state_dict().values()) for layer in model.model.layers) * 4


def _plans(monkeypatch, module):
    plans, real = [], module.plan_memory
    monkeypatch.setattr(module, "plan_memory", lambda *a, **k: plans.append(real(*a, **k)) or plans[-1])
    return plans


def test_streamed_perplexity_plans_with_the_largest_layer(tmp_path, monkeypatch):
    model = tiny_mixtral(hidden_size=64, intermediate_size=256)
    model.save_pretrained(tmp_path / "model")
    plans = _plans(monkeypatch, streamed_ppl)
    windows = torch.randint(3, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    streamed_ppl.streamed_perplexity(tmp_path / "model", windows, max_memory=BUDGET, offload_dir=tmp_path / "s",
                                     progress=False)
    layer = _largest_layer_bytes(model)
    assert (plans[0].layer_bytes, plans[0].shard_size) == (layer, 0)  # nothing is written: no output shard
    assert plans[0].activation_bytes + layer > BUDGET and plans[0].offload


def test_streamed_prune_plans_with_the_largest_layer(tmp_path, monkeypatch):
    model = tiny_mixtral(hidden_size=64, intermediate_size=256)
    model.save_pretrained(tmp_path / "model")
    plans = _plans(monkeypatch, streamed_prune)
    streamed_prune.prune_checkpoint(tmp_path / "model", tmp_path / "out", calibration(model), num_experts=4,
                                    max_memory=BUDGET, progress=False)
    layer = _largest_layer_bytes(model)
    assert plans[0].layer_bytes == layer and plans[0].activation_bytes + layer > BUDGET and plans[0].offload


# --- 5, 6, 9. the CLI refuses before reading any data ---------------------------------------------------------------
def test_compare_larger_than_memory_names_the_families_it_runs(tmp_path, monkeypatch, capsys):
    tiny_moe("qwen3_next").save_pretrained(tmp_path / "model")
    (tmp_path / "calib.txt").write_text(TINY_WORDS + "\n")
    _no_data(monkeypatch)
    assert _cli(tmp_path, tmp_path / "out", "--methods", "reap", "--max-memory", "1KB") == 2
    err = capsys.readouterr().err
    assert "--device-map" not in err
    assert "'qwen3_next' model is compared in memory only (leave out --max-memory or raise it)" in err
    assert "mixtral" in err


def test_offload_dir_without_max_memory_is_refused(source, tmp_path, monkeypatch, capsys):
    _no_data(monkeypatch)
    assert _cli(source, tmp_path / "out", "--methods", "reap", "--offload-dir", tmp_path / "scratch") == 2
    assert "--offload-dir needs --max-memory" in capsys.readouterr().err


def test_offload_dir_unused_when_the_model_fits(source, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(compare, "compare_methods", _in_memory)
    with pytest.raises(_InMemory):
        _cli(source, tmp_path / "out", "--methods", "reap", "--max-memory", "100GB", "--offload-dir", tmp_path / "s")
    assert "compared in memory; --offload-dir is not used" in capsys.readouterr().out


def test_out_naming_a_file_is_refused_before_any_work(source, tmp_path, monkeypatch, capsys):
    (tmp_path / "notes.txt").write_text("user's file\n")
    _no_data(monkeypatch)
    for budget in ([], ["--max-memory", "1KB"]):  # in memory and layer by layer
        assert _cli(source, tmp_path / "notes.txt", "--methods", "reap", *budget) == 2
        assert f"--out {tmp_path / 'notes.txt'} is a file; give a directory" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "user's file\n"


# --- 7. the table ---------------------------------------------------------------------------------------------------
def test_table_shows_the_experts_removed_and_nan():
    result = {"experts": 8, "kd_steps": 0, "rows": [
        {"method": "full", "ratio": 0.0, "experts": 8, "expert_share": 1.0, "form": "original", "perplexity": 5.0},
        {"method": "reap", "ratio": 0.3, "experts": 6, "expert_share": 0.75, "form": "standard",
         "perplexity": float("nan")},
        {"method": "m-smoe", "ratio": 0.3, "experts": 6, "expert_share": 0.75, "form": "exact",
         "perplexity": math.inf}]}
    lines = compare.markdown_table(result).splitlines()
    assert lines[2] == "| full | 0% | 8 | 100.0% | original | 5.000 |"
    assert lines[3] == "| reap | 25% | 6 | 75.0% | standard | nan |"
    assert lines[4] == "| m-smoe | 25% | 6 | 75.0% | exact | inf |"


# --- 8. MXFP4 counted dequantized ----------------------------------------------------------------------------------
def test_mxfp4_checkpoint_counted_as_its_dequantized_values(tmp_path):
    from mcsmoe_fast.streaming.quantized import quantize_checkpoint
    from mcsmoe_fast.streaming.source import open_weight_files

    mxfp4 = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn",
                                                                 "model.layers.*.mlp.router", "model.embed_tokens",
                                                                 "lm_head"]}
    tiny_moe("gpt_oss", hidden_size=64, intermediate_size=128).save_pretrained(tmp_path / "plain")
    quantize_checkpoint(tmp_path / "plain", tmp_path / "mx", mxfp4)
    assert any(n.endswith("_blocks") for n in open_weight_files(tmp_path / "mx").shapes)
    for dtype in (torch.float32, torch.bfloat16):  # the same values as the plain checkpoint's, largest layer too
        assert checkpoint_bytes(tmp_path / "mx", dtype) == checkpoint_bytes(tmp_path / "plain", dtype)
    loaded = open_model(str(tmp_path / "mx"), torch.float32)
    assert in_memory_bytes(tmp_path / "mx") > sum(p.numel() * p.element_size() for p in loaded.parameters())
    # dtype None (prune / compress keeping the quantization): counted as open_model holds it by default
    assert next(open_model(str(tmp_path / "mx")).parameters()).dtype == torch.bfloat16
    assert in_memory_bytes(tmp_path / "mx", None) == in_memory_bytes(tmp_path / "mx", torch.bfloat16)


def test_recover_gives_every_teacher_module_its_mode_back():
    """KD recovery sets the teacher to eval for its run; every teacher module comes back in its own mode (a part the
    user kept in eval while the rest trains came back in training mode: teacher.train(flag) sets them all)."""
    from mcsmoe_fast.train import TrainConfig

    teacher, student = tiny_mixtral(seed=0), tiny_mixtral(seed=1)
    teacher.train()
    teacher.model.embed_tokens.eval()
    modes = {n: m.training for n, m in teacher.named_modules()}
    ids = torch.randint(0, teacher.config.vocab_size, (4, 8), generator=torch.Generator().manual_seed(0))
    compare.recover(student, teacher, list(ids), TrainConfig(steps=1, batch_size=2, learning_rate=1e-4))
    assert {n: m.training for n, m in teacher.named_modules()} == modes
