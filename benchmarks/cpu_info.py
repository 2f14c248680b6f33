"""The CPU a benchmark ran on, printed with every table: results differ between an AMD EPYC (AVX-512, no AMX)
and an Intel Xeon with AMX (bf16 matmul several times faster), so a figure without its CPU means little."""
from __future__ import annotations

import platform
from pathlib import Path

import torch

FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")


def cpu_identity() -> tuple[str, set[str]]:
    """(model name, every flag /proc/cpuinfo lists); (the platform's name, an empty set) where it cannot tell."""
    name, flags = platform.processor() or platform.machine(), set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
            if name and flags:
                break
    return name, flags


def native_bf16() -> bool:
    """Whether the CPU multiplies bf16 natively (AVX-512 BF16 or AMX): without it ATen's bf16 GEMMs, which
    transformers' bf16 cells run, are 10-100x slower than fp32 and the slow cells are skipped."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_identity()[1])


def cpu_line() -> str:
    """'CPU: <model name>; flags: <those of FLAGS present>; torch threads: N; torch <version>'."""
    name, flags = cpu_identity()
    present = [f for f in FLAGS if f in flags] or ["none of " + " ".join(FLAGS)]
    return f"CPU: {name}; flags: {' '.join(present)}; torch threads: {torch.get_num_threads()}; torch {torch.__version__}"
