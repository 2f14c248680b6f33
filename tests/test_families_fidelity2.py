"""Families the layer-by-layer forward does not run (session 36's family audit; each test failed before its fix):
a step without a device map (prune, the streamed perplexity) says to run in memory instead of naming merge's
--device-map, which it does not have, and every message and help text names Llama-4 among those families."""
import torch

from mcsmoe_fast.cli import main
from mcsmoe_fast.streaming.perplexity import streamed_perplexity
from mcsmoe_fast.tiny import tiny_moe, tiny_tokenizer


def test_prune_larger_than_memory_refuses_a_dispatch_family_with_a_hint_it_can_follow(tmp_path, capsys):
    tiny_moe("llama4_text").save_pretrained(tmp_path / "m")
    tiny_tokenizer().save_pretrained(tmp_path / "m")
    (tmp_path / "calib.txt").write_text("the quick brown fox\njumps over a lazy dog\n")
    rc = main([str(a) for a in ("prune", "--model", tmp_path / "m", "--calib", tmp_path / "calib.txt",
                                "--num-experts", 4, "--max-memory", "150KB", "--out", tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "Llama-4" in err and "without max_memory / --max-memory" in err
    assert "--device-map auto" not in err  # prune has no such option
    assert not (tmp_path / "out").exists()
    # the streamed perplexity has no device map either
    try:
        streamed_perplexity(tmp_path / "m", torch.randint(3, 50, (2, 8)), max_memory="1MB", progress=False)
    except ValueError as exc:
        assert "without max_memory" in str(exc) and "Llama-4" in str(exc)
    else:
        raise AssertionError("the streamed perplexity ran Llama-4's layers layer by layer")


def test_merge_help_names_every_family_that_needs_a_device_map(capsys):
    try:
        main(["merge", "--help"])
    except SystemExit:
        pass
    text = " ".join(capsys.readouterr().out.split())
    assert text.count("Qwen3.5-MoE and Llama-4") == 2
