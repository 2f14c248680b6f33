"""Quantized checkpoints (issue 23), measured on this machine and written for docs/quantized.md:

1. dequantize / quantize throughput of one DeepSeek-V3-shaped expert bank (block-FP8, [n, 2048, 7168] and
   [n, 7168, 2048]) and one GPT-OSS-shaped MXFP4 bank, plain PyTorch;
2. a streamed merge of a Mixtral-shaped block-FP8 checkpoint under --max-memory vs the same merge of its
   dequantized bf16 twin in the same run: seconds, bytes read, peak RSS, the quantization error the
   re-quantized merged banks add (relative to the twin's merged banks, and as the run itself reports it:
   weights and layer outputs on calibration tokens), and whether every dequantized merged weight is within
   one e4m3 step of the bf16 path's.

    python benchmarks/bench_quantized.py [--layers 4 --hidden 1024 --ff 1792 --experts 8]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from mcsmoe_fast.quant import dequantize_fp8, dequantize_mxfp4, quantize_fp8, quantize_mxfp4  # noqa: E402
from mcsmoe_fast.streaming import merge_checkpoint  # noqa: E402
from mcsmoe_fast.streaming.quantized import quantize_checkpoint  # noqa: E402

FP8 = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}


def timed(fn, repeat=3):
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def kernels(n: int) -> dict:
    torch.manual_seed(0)
    w = (torch.randn(n, 2048, 7168) * 0.02).to(torch.bfloat16)
    params = w.numel()
    tq, (q, s) = timed(lambda: quantize_fp8(w))
    td, _ = timed(lambda: dequantize_fp8(q, s, torch.bfloat16))
    blocks, scales = quantize_mxfp4(w[:1].float())
    tmq, _ = timed(lambda: quantize_mxfp4(w[:1]))
    tmd, _ = timed(lambda: dequantize_mxfp4(blocks, scales, torch.bfloat16))
    per = params / n
    return dict(fp8_params=params, fp8_dequant_s=td, fp8_quant_s=tq,
                fp8_dequant_Mparams_s=params / td / 1e6, fp8_quant_Mparams_s=params / tq / 1e6,
                mxfp4_dequant_Mparams_s=per / tmd / 1e6, mxfp4_quant_Mparams_s=per / tmq / 1e6)


def streamed(args) -> dict:
    root = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench-quantized-"))
    if not ((root / "fp8" / "config.json").is_file() and (root / "twin" / "config.json").is_file()):
        # built in a child too: Linux keeps a process's ru_maxrss across fork and exec, so merges started from a
        # parent that had held the model would all report the parent's peak (1.3 GB here for the 4-layer model)
        subprocess.run([sys.executable, __file__, "--build", "--workdir", str(root), "--layers", str(args.layers),
                        "--hidden", str(args.hidden), "--ff", str(args.ff), "--experts", str(args.experts)], check=True)
    # each merge in a fresh process (peak RSS its own, not the setup's), in the order twin, fp8, fp8, twin so
    # that a drift in the shared machine's load falls on both alike; the best of each pair is reported
    runs = {"twin": [], "fp8": []}
    for name in ("twin", "fp8", "fp8", "twin")[: 2 * args.repeat]:
        child = subprocess.run([sys.executable, __file__, "--merge-one", name, "--workdir", str(root),
                                "--experts", str(args.experts), "--max-memory", args.max_memory],
                               check=True, capture_output=True, text=True)
        runs[name].append(json.loads(child.stdout.strip().splitlines()[-1]))
    out = {name: min(r, key=lambda x: x["seconds"]) | {"all_seconds": [x["seconds"] for x in r]}
           for name, r in runs.items()}
    print(json.dumps(out, indent=2), flush=True)
    q, t = ({k: v for f in sorted((root / f"out-{n}").glob("*.safetensors")) for k, v in load_file(str(f)).items()}
            for n in ("fp8", "twin"))  # every shard
    errors, within = [], True
    for name in t:
        if name.endswith((".experts.w_in", ".experts.w_out")):
            d = dequantize_fp8(q[name], q[name + "_scale_inv"]).float()
            exact = t[name].float()
            scale = q[name + "_scale_inv"].float().repeat_interleave(128, -2)[..., :exact.shape[-2], :]
            scale = scale.repeat_interleave(128, -1)[..., :exact.shape[-1]]
            within &= bool(((d - exact).abs() <= exact.abs() * 2.0 ** -4 + scale * 2.0 ** -10).all())
            errors.append(((d - exact).norm() / exact.norm()).item())
    out["merged_bank_relative_error"] = dict(max=max(errors), mean=sum(errors) / len(errors))
    out["within_one_e4m3_step_of_bf16_path"] = within
    out["slowdown"] = out["fp8"]["seconds"] / out["twin"]["seconds"]
    out["workdir"] = str(root)
    return out


def build(args) -> None:
    """The Mixtral-shaped checkpoint in bf16, written as block-FP8 and as its dequantized twin (transformers'
    dequantize=True load saved in bf16), in workdir/fp8 and workdir/twin."""
    from transformers import AutoModelForCausalLM, FineGrainedFP8Config, MixtralConfig, MixtralForCausalLM

    root = Path(args.workdir)
    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=1024, hidden_size=args.hidden, intermediate_size=args.ff,
                           num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=2,
                           num_local_experts=args.experts, num_experts_per_tok=2, max_position_embeddings=512)
    MixtralForCausalLM(config).to(torch.bfloat16).save_pretrained(root / "plain")
    quantize_checkpoint(root / "plain", root / "fp8", FP8)
    twin = AutoModelForCausalLM.from_pretrained(str(root / "fp8"), dtype=torch.bfloat16,
                                                quantization_config=FineGrainedFP8Config(dequantize=True))
    if hasattr(twin.config, "quantization_config"):
        del twin.config.quantization_config
    twin.save_pretrained(root / "twin")


def merge_one(args) -> dict:
    """One streamed merge of workdir/<name> into workdir/out-<name> (run in a child process)."""
    import resource

    from transformers import MixtralConfig, MixtralForCausalLM
    from merge_helpers import calibration

    root = Path(args.workdir)
    batches = calibration(MixtralForCausalLM(MixtralConfig(vocab_size=1024, num_hidden_layers=1, hidden_size=32,
                                                           intermediate_size=32, num_attention_heads=4,
                                                           num_key_value_heads=2)),
                          seed=1, batches=4, batch=4, length=64, pad=False)
    name = args.merge_one
    t = time.perf_counter()
    r = merge_checkpoint(root / name, root / f"out-{name}", batches, args.experts // 2, progress=False,
                         dtype=torch.bfloat16, max_memory=args.max_memory, globally=False)
    out = dict(seconds=time.perf_counter() - t, bytes_read=r.bytes_read, bytes_written=r.bytes_written,
               peak_rss=r.peak_rss, max_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
               source_bytes=sum(p.stat().st_size for p in (root / name).glob("*.safetensors")))
    if r.quantization_error is not None:
        out["reported_error"] = dict(max=r.quantization_error["max"], mean=r.quantization_error["mean"])
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--ff", type=int, default=1792)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--max-memory", default="1GB")
    p.add_argument("--kernel-experts", type=int, default=4, help="0: skip the kernel throughputs")
    p.add_argument("--out", default=None, help="also write the result to this json file")
    p.add_argument("--workdir", default=None, help="keep the checkpoints here (reused when already built)")
    p.add_argument("--repeat", type=int, default=2, choices=(1, 2), help="merges per checkpoint (2: twin, fp8, fp8, twin)")
    p.add_argument("--merge-one", default=None, help=argparse.SUPPRESS)
    p.add_argument("--build", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.build:
        build(args)
        return
    if args.merge_one:
        print(json.dumps(merge_one(args)))
        return
    torch.set_num_threads(max(1, torch.get_num_threads()))
    result = dict(threads=torch.get_num_threads(), kernels=kernels(args.kernel_experts) if args.kernel_experts else None,
                  streamed=streamed(args), shape=vars(args))
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
