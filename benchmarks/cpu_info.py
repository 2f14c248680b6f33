"""The CPU a benchmark ran on, printed with every table: results differ between an AMD EPYC (AVX-512, no AMX)
and an Intel Xeon with AMX (bf16 matmul several times faster), so a figure without its CPU means little."""
from __future__ import annotations

import platform
from pathlib import Path

import torch

FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")


def cpu_line() -> str:
    """'CPU: <model name>; flags: <those of FLAGS present>; torch threads: N; torch <version>'."""
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
    present = [f for f in FLAGS if f in flags] or ["none of " + " ".join(FLAGS)]
    return f"CPU: {name}; flags: {' '.join(present)}; torch threads: {torch.get_num_threads()}; torch {torch.__version__}"
