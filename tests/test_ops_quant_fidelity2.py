"""Second ops audit (ops.py fakes, block-FP8 and MXFP4 edges); each test failed before its fix:
- a meta tensor among arguments the fake kernels did not device-check made the dispatcher run the fake, which
  returned uninitialized CPU memory, no error (grouped_expert_ffn_slr's expert_map / top_k_weights,
  grouped_expert_ffn_backward's h_rows, moe_align's three tensors);
- quantize_fp8 wrote a block holding NaN or inf on a wrong scale ([nan, 1000, 2000, 1e-4] read back as [nan, 448, 448, 0]);
- dequantize_mxfp4 read the e8m0 scale byte 255 (NaN in the OCP MX format) as 2^128;
- a block size that is not two integers >= 1 gave ZeroDivisionError or torch's errors, not naming `block`."""
import pytest
import torch

from mcsmoe_fast import ops
from mcsmoe_fast.quant import fp8, mxfp4


# --- finding 1: every argument's device checked by the fakes ------------------------------------------------
def slr_problem():
    g = torch.Generator().manual_seed(0)
    T, d, ff, S = 4, 6, 5, 2
    hidden = torch.randn(T, d, generator=g)
    w_in = [torch.randn(S, 2 * ff, 2, generator=g), torch.randn(S, 2, d, generator=g), torch.randn(2, d, generator=g),
            torch.tensor([0, 1]), torch.tensor([0, 1, 2])]
    w_out = [torch.randn(S, d, 2, generator=g), torch.randn(S, 2, ff, generator=g), torch.randn(2, ff, generator=g),
             torch.tensor([0, 1]), torch.tensor([0, 1, 2])]
    emap, index = torch.tensor([0, 1, 1]), torch.tensor([[0, 1], [2, -1], [1, 1], [0, 2]])
    return hidden, w_in, w_out, emap, index, torch.rand(T, 2, generator=g)


@pytest.mark.parametrize("position,name", [(3, "expert_map"), (5, "top_k_weights"), (4, "top_k_index")])
def test_slr_meta_argument_is_named(position, name):
    args = list(slr_problem())
    args[position] = args[position].to("meta")
    with pytest.raises(RuntimeError, match=f"^grouped_expert_ffn_slr: all tensors must be on one device, got {name} on "
                                           "meta and hidden on cpu"):
        ops.grouped_expert_ffn_slr(*args, "swiglu")


def test_slr_all_on_meta_still_traces():
    args = [a.to("meta") if isinstance(a, torch.Tensor) else [t.to("meta") for t in a] for a in slr_problem()]
    out = ops.grouped_expert_ffn_slr(*args, "swiglu")
    assert out.device.type == "meta" and tuple(out.shape) == (4, 6)


def test_backward_meta_h_rows_is_named():
    g = torch.Generator().manual_seed(1)
    hidden, w_in, w_out = torch.randn(4, 6, generator=g), torch.randn(2, 10, 6, generator=g), torch.randn(2, 6, 5, generator=g)
    emap, index, weights = torch.tensor([0, 1, 1]), torch.tensor([[0, 1], [2, -1], [1, 1], [0, 2]]), torch.rand(4, 2)
    with pytest.raises(RuntimeError, match="^grouped_expert_ffn_backward: all tensors must be on one device, got h_rows "
                                           "on meta and hidden on cpu"):
        ops.grouped_expert_ffn_backward(hidden, hidden, w_in, w_out, emap, index, weights, "swiglu",
                                        h_rows=torch.randn(8, 10, device="meta"))


@pytest.mark.parametrize("position,name", [(0, "top_k_index"), (1, "top_k_weights"), (2, "expert_map")])
def test_moe_align_mixed_devices_are_named(position, name):
    args = [torch.tensor([[0, 1], [2, -1]]), torch.rand(2, 2), torch.tensor([0, 1, 1])]
    args[position] = args[position].to("meta")
    other = "top_k_weights" if position == 0 else "top_k_index"
    with pytest.raises(RuntimeError, match=f"^moe_align: all tensors must be on one device, got {name} on meta and "
                                           f"{other} on cpu"):
        ops.moe_align(*args, 2)


def test_moe_align_all_on_meta_still_traces():
    out = ops.moe_align(torch.zeros(3, 2, dtype=torch.long, device="meta"), torch.zeros(3, 2, device="meta"),
                        torch.zeros(4, dtype=torch.long, device="meta"), 5)
    assert [tuple(t.shape) for t in out] == [(6,), (6,), (6,), (3, 2)] and all(t.device.type == "meta" for t in out)


# --- finding 2: quantize_fp8 refuses NaN and inf ------------------------------------------------------------
@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("scale_fmt", ["float", "ue8m0"])
@pytest.mark.parametrize("special", [float("nan"), float("inf"), -float("inf")])
def test_quantize_fp8_refuses_nan_and_inf(special, scale_fmt, native):
    w = torch.randn(2, 6, 8)
    w[1, 5, 2] = special
    with pytest.raises(ValueError, match=r"^w: NaN or inf at \(1, 5, 2\) \(block \(1, 1, 0\)\)"):
        fp8.quantize_fp8(w, block=(4, 4), scale_fmt=scale_fmt, native=native)


def test_quantize_fp8_refuses_float64_past_float32():
    w = torch.zeros(4, 4, dtype=torch.float64)
    w[2, 3] = 1e300  # inf once in float32, where the scales are computed
    with pytest.raises(ValueError, match=r"^w: NaN or inf \(as float32\) at \(2, 3\)"):
        fp8.quantize_fp8(w, block=(2, 2))


def test_quantize_fp8_finite_extremes_still_quantize():
    w = torch.tensor([[1000.0, 2000.0, 1e-4, -3e38]])
    q, s = fp8.quantize_fp8(w, block=(1, 2))
    assert torch.equal(s, torch.tensor([[2000.0, 3e38]]) / 448.0)  # the float32 quotients, exactly
    assert q.to(torch.float32)[0, :2].tolist() == [224.0, 448.0]


# --- finding 3: the MXFP4 scale byte 255 is refused on read -------------------------------------------------
@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("transpose", [False, True])
def test_mxfp4_scale_byte_255_is_refused(native, transpose):
    blocks = torch.full((3, 2, 16), 0x21, dtype=torch.uint8)
    scales = torch.full((3, 2), 127, dtype=torch.uint8)
    scales[1, 1] = 255
    out = torch.empty((64, 3) if transpose else (3, 64))
    with pytest.raises(ValueError, match=r"^scales: e8m0 byte 255 at \(1, 1\)"):
        mxfp4.dequantize_mxfp4_into(blocks, scales, out, transpose=transpose, native=native)
    with pytest.raises(ValueError, match=r"^scales: e8m0 byte 255 at \(1, 1\)"):
        mxfp4.dequantize_mxfp4(blocks, scales, native=native)


def test_mxfp4_scale_byte_254_still_reads():
    blocks = torch.full((1, 1, 16), 0x21, dtype=torch.uint8)  # codes 0.5, 1.0
    got = mxfp4.dequantize_mxfp4(blocks, torch.tensor([[254]], dtype=torch.uint8))
    assert got[0, :2].tolist() == [2.0 ** 126, 2.0 ** 127]


# --- finding 5: block sizes checked up front ----------------------------------------------------------------
BAD_BLOCKS = [(0, 4), (-2, 4), (2.5, 4), (2,), (2, 4, 4), (True, 4), 128]


@pytest.mark.parametrize("block", BAD_BLOCKS)
@pytest.mark.parametrize("native", [True, False])
def test_bad_block_sizes_are_named(block, native):
    w = torch.randn(4, 8)
    q, s = fp8.quantize_fp8(w, block=(2, 4))
    want = "^" + "block: expected two integers >= 1 (rows, cols), got " + repr(block)
    want = want.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")
    with pytest.raises(ValueError, match=want):
        fp8.quantize_fp8(w, block=block, native=native)
    with pytest.raises(ValueError, match=want):
        fp8.dequantize_fp8(q, s, block=block, native=native)
    with pytest.raises(ValueError, match=want):
        fp8.scale_grid((4, 8), block)


def test_a_nan_scale_in_a_checkpoint_names_its_tensor(tmp_path):
    """The MXFP4 reader names the checkpoint tensor holding a scale byte 255 (the op alone cannot)."""
    from safetensors.torch import save_file

    from mcsmoe_fast.quant.files import QuantizedFiles
    from mcsmoe_fast.quant.format import QuantFormat
    from mcsmoe_fast.streaming.source import open_weight_files

    blocks = torch.randint(0, 256, (2, 4, 2, 16), dtype=torch.uint8)
    scales = torch.full((2, 4, 2), 127, dtype=torch.uint8)
    scales[1, 2, 0] = 255
    save_file({"mlp.experts.down_proj_blocks": blocks, "mlp.experts.down_proj_scales": scales},
              str(tmp_path / "model.safetensors"))
    files = QuantizedFiles(open_weight_files(tmp_path), QuantFormat("mxfp4"))
    with pytest.raises(ValueError, match=r"mlp\.experts\.down_proj_scales \(expert 1\): .*255"):
        files.read_into("mlp.experts.down_proj", torch.empty(2, 64, 4))  # stored transposed (GPT-OSS)
