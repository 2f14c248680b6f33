"""`mcsmoe-fast compress` end to end, offline, on tiny merged models (workspace from test_cli_merge)."""
import torch

from mcsmoe_fast import from_pretrained, moe_layers
from mcsmoe_fast.modules.compressed import CompressedMoEExperts
from test_cli_merge import run, workspace  # noqa: F401  (the fixture)


def merged(workspace, capsys, family="mixtral"):
    out = workspace / f"{family}-merged"
    args = ["merge", "--model", workspace / family, "--calib", workspace / "calib.txt", "--num-groups", 2,
            "--out", out]
    if family == "switch":
        args += ["--tokenizer", workspace / "tokenizer"]
    rc, _, err = run(args, capsys)
    assert rc == 0, err
    return out


def test_compress_by_weight_saves_a_smaller_model(workspace, capsys):
    src = merged(workspace, capsys)
    rc, out, err = run(["compress", "--model", src, "--out", workspace / "c", "--rank", 4, "--keep-ratio", 0.2], capsys)
    assert rc == 0, err
    assert "rank in/out" in out and "compressed 2 layers" in out and "after compressing" in out
    model = from_pretrained(workspace / "c")
    assert all(isinstance(layer.module.experts, CompressedMoEExperts) for layer in moe_layers(model))
    assert all(layer.module.experts.in_U.shape[2] == 4 for layer in moe_layers(model))
    assert (workspace / "c" / "tokenizer.json").is_file()
    size = lambda d: sum(f.stat().st_size for f in d.iterdir())
    assert size(workspace / "c") < size(src)


def test_compress_by_activation_uses_the_calibration_text(workspace, capsys):
    src = merged(workspace, capsys)
    for importance, out_dir in (("weight", "w"), ("activation", "a")):
        args = ["compress", "--model", src, "--out", workspace / out_dir, "--rank", 2, "--keep-ratio", 0.2,
                "--importance", importance, "--svd", "exact"]
        if importance == "activation":
            args += ["--calib", workspace / "calib.txt"]
        rc, _, err = run(args, capsys)
        assert rc == 0, err
    rows = [[layer.module.experts.in_row_idx for layer in moe_layers(from_pretrained(workspace / d))] for d in "wa"]
    assert not all(torch.equal(a, b) for a, b in zip(*rows))


def test_compress_switch_layers_option(workspace, capsys):
    src = merged(workspace, capsys, "switch")
    rc, out, err = run(["compress", "--model", src, "--out", workspace / "c", "--layers", "1"], capsys)
    assert rc == 0, err
    kinds = [type(layer.module.experts).__name__ for layer in moe_layers(from_pretrained(workspace / "c"))]
    assert kinds.count("CompressedMoEExperts") == 1 and kinds[1] == "CompressedMoEExperts"


def test_compress_refuses_bad_input_and_writing_over_its_input(workspace, capsys):
    src = merged(workspace, capsys)
    before = {f.name: f.read_bytes() for f in src.iterdir()}
    for args, message in (
        (["--out", src], "input model's directory"),
        (["--out", src / "sub"], "input model's directory"),
        (["--out", workspace / "x", "--rank", 0], "--rank must be an int >= 1, got 0"),
        (["--out", workspace / "x", "--keep-ratio", 1.5], "--keep-ratio must be in (0, 1], got 1.5"),
        (["--out", workspace / "x", "--importance", "activation"], "needs --calib"),
    ):
        rc, _, err = run(["compress", "--model", src, *args], capsys)
        assert rc == 2 and message in err, err
    assert {f.name: f.read_bytes() for f in src.iterdir()} == before
    assert not (workspace / "x").exists()
    rc, _, _ = run(["compress", "--model", src, "--out", workspace / "c"], capsys)
    rc, _, err = run(["compress", "--model", workspace / "c", "--out", workspace / "c4"], capsys)
    assert rc == 2 and "already compressed" in err


def test_streamed_compress_writes_the_dtype_asked_for(workspace, capsys):
    """compress --max-memory --dtype: the layer-by-layer path honours --dtype (it used to write the checkpoint's own),
    equal to the in-memory compression of the model loaded in that dtype."""
    from mcsmoe_fast import compress_experts

    src = merged(workspace, capsys)
    assert from_pretrained(src).dtype == torch.float32
    rc, out, err = run(["compress", "--model", src, "--out", workspace / "cb", "--rank", 4, "--keep-ratio", 0.2,
                        "--max-memory", "1KB", "--dtype", "bfloat16"], capsys)
    assert rc == 0, err
    assert "layer by layer" in out
    got = from_pretrained(workspace / "cb").state_dict()
    want = from_pretrained(src, dtype=torch.bfloat16)
    compress_experts(want, rank=4, keep_ratio=0.2, importance="weight", progress=False)
    want = want.state_dict()
    assert sorted(got) == sorted(want) and got["model.layers.0.mlp.experts.in_U"].dtype == torch.bfloat16
    assert all(torch.equal(got[n], want[n]) for n in want)
