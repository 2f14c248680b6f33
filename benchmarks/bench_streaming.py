"""Streaming merge vs the in-memory pipeline on a random Mixtral-style checkpoint of about 3 GB.

    python benchmarks/bench_streaming.py [--dir /tmp/bench-streaming] [--budget 1GB] [--keep]

Writes a random fp32 checkpoint in the original Mixtral layout (per-expert w1/w2/w3, sharded, with
model.safetensors.index.json), one layer at a time so the writer itself stays small: hidden 1024,
intermediate 3584, 8 experts, 8 layers, vocabulary 32000 = 3.2 GB. Then, each in a fresh subprocess:

- streaming:  mcsmoe_fast.streaming.merge_checkpoint(..., num_groups=4, max_memory=budget)
- device-map: the same with device_map="auto": the statistics pass is the model's own forward under
              accelerate (the CPU takes layers up to the budget, the rest is offloaded to disk)
- in-memory:  open_model -> collect_routing_stats -> merge_experts(4) -> save_pretrained

and reports per mode the wall time, the peak RSS (the child's ru_maxrss), the bytes it read from disk
(/proc/self/io read_bytes; the checkpoint's pages are evicted from the page cache first with
posix_fadvise, so these are real reads), the bytes read through read() or page faults (rchar) and
the bytes written to disk (write_bytes: the output, and accelerate's offloaded weights), plus whether
every output holds the in-memory run's tensors. The checkpoint files are removed at the end unless
--keep. A script, not a test.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from cpu_info import cpu_line  # noqa: E402

HIDDEN, INTERMEDIATE, EXPERTS, LAYERS, VOCAB, HEADS, KV_HEADS = 1024, 3584, 8, 8, 32000, 8, 8
GROUPS = 4
CALIBRATION = dict(batches=4, batch=2, length=128)


def config():
    from transformers import MixtralConfig

    return MixtralConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                         num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                         num_local_experts=EXPERTS, num_experts_per_tok=2, max_position_embeddings=4096,
                         tie_word_embeddings=False)


def write_checkpoint(path: Path) -> int:
    """A random checkpoint, one shard per layer (+ one for embeddings and head); returns its bytes."""
    import torch
    from safetensors.torch import save_file

    path.mkdir(parents=True)
    config().save_pretrained(path)
    g = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    head_dim = HIDDEN // HEADS

    def randn(*shape):
        return torch.randn(*shape, generator=g) * 0.02

    def shard(k: int) -> dict:  # shard 0: embeddings, norm, head; shard i + 1: decoder layer i
        if k == 0:
            return {"model.embed_tokens.weight": randn(VOCAB, HIDDEN), "lm_head.weight": randn(VOCAB, HIDDEN),
                    "model.norm.weight": torch.ones(HIDDEN)}
        p = f"model.layers.{k - 1}"
        layer = {f"{p}.self_attn.q_proj.weight": randn(HEADS * head_dim, HIDDEN),
                 f"{p}.self_attn.k_proj.weight": randn(KV_HEADS * head_dim, HIDDEN),
                 f"{p}.self_attn.v_proj.weight": randn(KV_HEADS * head_dim, HIDDEN),
                 f"{p}.self_attn.o_proj.weight": randn(HIDDEN, HEADS * head_dim),
                 f"{p}.input_layernorm.weight": torch.ones(HIDDEN),
                 f"{p}.post_attention_layernorm.weight": torch.ones(HIDDEN),
                 f"{p}.block_sparse_moe.gate.weight": randn(EXPERTS, HIDDEN)}
        for j in range(EXPERTS):
            layer[f"{p}.block_sparse_moe.experts.{j}.w1.weight"] = randn(INTERMEDIATE, HIDDEN)
            layer[f"{p}.block_sparse_moe.experts.{j}.w3.weight"] = randn(INTERMEDIATE, HIDDEN)
            layer[f"{p}.block_sparse_moe.experts.{j}.w2.weight"] = randn(HIDDEN, INTERMEDIATE)
        return layer

    count = LAYERS + 1
    for k in range(count):  # one shard in memory at a time (a layer is 370 MB)
        tensors = shard(k)
        name = f"model-{k + 1:05d}-of-{count:05d}.safetensors"
        save_file(tensors, str(path / name), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update(dict.fromkeys(tensors, name))
        del tensors
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return total


def evict(path: Path) -> None:
    """Drop the checkpoint's pages from the page cache (our files only), so reads hit the disk."""
    for f in path.iterdir():
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def proc_io() -> dict:
    try:
        return {k: int(v) for k, v in (line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())}
    except OSError:
        return {}


def rss_parts() -> dict:
    """Resident memory now by kind (GiB): anonymous (the process's own allocations) and file-backed
    (mapped checkpoint pages: page cache the kernel can drop, but counted in RSS and ru_maxrss)."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024
    return out


class PeakSampler:
    """Highest RssAnon / RssFile seen, sampled every 10 ms on a thread."""

    def __init__(self):
        import threading

        self.peaks, self.done = {"RssAnon": 0, "RssFile": 0}, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.done.wait(0.01):
            for key, value in rss_parts().items():
                self.peaks[key] = max(self.peaks[key], value)

    def stop(self) -> dict:
        self.done.set()
        self.thread.join()
        return self.peaks


def batches():
    import torch

    g = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(3, VOCAB, (CALIBRATION["batch"], CALIBRATION["length"]), generator=g),
             "attention_mask": torch.ones(CALIBRATION["batch"], CALIBRATION["length"], dtype=torch.long)}
            for _ in range(CALIBRATION["batches"])]


def run_mode(mode: str, src: Path, out: Path, budget: str) -> dict:
    """In this (child) process: one merge; returns its measurements."""
    io0, t0, sampler = proc_io(), time.perf_counter(), PeakSampler()
    extra = {}
    if mode in ("streaming", "device-map"):
        from mcsmoe_fast.streaming import merge_checkpoint

        result = merge_checkpoint(src, out, batches(), GROUPS, max_memory=budget, progress=True,
                                  device_map="auto" if mode == "device-map" else None)
        extra = {"bytes_read_counted": result.bytes_read, "offloaded": result.offloaded,
                 "sampled_peak_rss": result.peak_rss, "seconds": result.seconds}
    else:
        from mcsmoe_fast import collect_routing_stats, merge_experts, open_model, save_pretrained

        model = open_model(str(src))
        stats = collect_routing_stats(model, batches())
        merge_experts(model, stats, GROUPS)
        save_pretrained(model, out)
    io1, peaks = proc_io(), sampler.stop()
    return {"mode": mode, "wall_s": time.perf_counter() - t0, "peak_anon": peaks["RssAnon"],
            "peak_file": peaks["RssFile"],
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "disk_read_bytes": io1.get("read_bytes", 0) - io0.get("read_bytes", 0),
            "rchar": io1.get("rchar", 0) - io0.get("rchar", 0),
            "disk_write_bytes": io1.get("write_bytes", 0) - io0.get("write_bytes", 0), **extra}


def same_tensors(a: Path, b: Path) -> bool:
    import torch

    from mcsmoe_fast.checkpoint import open_weights, read_section

    wa, wb = (open_weights(p, read_section(p), verify=False) for p in (a, b))
    if set(wa.shapes) != set(wb.shapes):
        return False
    ok = all(torch.equal(wa.get(k), wb.get(k)) for k in wa.shapes)
    ca, cb = (json.loads((p / "config.json").read_text())["mcsmoe_merge"] for p in (a, b))
    return ok and ca["layers"] == cb["layers"] and ca["merges"] == cb["merges"]


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", default="/tmp/bench-streaming", help="work directory (about 6.5 GB)")
    parser.add_argument("--budget", default="1GB", help="max_memory of the streaming run")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints")
    parser.add_argument("--modes", default="streaming,device-map,in-memory",
                        help="comma-separated modes to run (the last one is the reference for identical outputs)")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    parser.add_argument("--child", nargs=3, metavar=("MODE", "SRC", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, src, out = args.child
        print("RESULT " + json.dumps(run_mode(mode, Path(src), Path(out), args.budget)), flush=True)
        return 0

    work = Path(args.dir)
    if work.exists():
        shutil.rmtree(work)
    src = work / "mixtral-3gb"
    try:
        t0 = time.perf_counter()
        size = write_checkpoint(src)
        print(f"wrote {gib(size)} in {len(list(src.glob('*.safetensors')))} shards in {time.perf_counter() - t0:.0f} s")
        results = {}
        modes = args.modes.split(",")
        for mode in modes:
            evict(src)
            child = subprocess.run([sys.executable, __file__, "--budget", args.budget, "--child", mode, str(src),
                                    str(work / f"out-{mode}")], stdout=subprocess.PIPE, text=True)
            if child.returncode != 0:
                print(f"{mode}: failed with exit code {child.returncode}")
                return 1
            line = next(x for x in child.stdout.splitlines() if x.startswith("RESULT "))
            results[mode] = json.loads(line[len("RESULT "):])
        identical = {m: same_tensors(work / f"out-{m}", work / f"out-{modes[-1]}") for m in modes[:-1]}
        print(f"\n{cpu_line()}")
        print(f"checkpoint {gib(size)} fp32 ({LAYERS} layers, {EXPERTS} experts, hidden {HIDDEN}, intermediate "
              f"{INTERMEDIATE}); merge {EXPERTS} -> {GROUPS}; streaming budget {args.budget}; calibration "
              f"{CALIBRATION['batches']}x{CALIBRATION['batch']}x{CALIBRATION['length']} tokens")
        print(f"{'mode':<10} {'wall':>8} {'peak RSS':>10} {'anon':>10} {'file':>10} {'disk reads':>11} {'rchar':>10} "
              f"{'disk writes':>12}")
        for mode, r in results.items():
            print(f"{mode:<10} {r['wall_s']:>7.1f}s {gib(r['peak_rss']):>10} {gib(r['peak_anon']):>10} "
                  f"{gib(r['peak_file']):>10} {gib(r['disk_read_bytes']):>11} {gib(r['rchar']):>10} "
                  f"{gib(r['disk_write_bytes']):>12}")
        print("(peak RSS: ru_maxrss; anon / file: the highest anonymous and file-backed parts sampled every 10 ms; "
              "file-backed pages are mapped checkpoint pages the kernel can drop)")
        for mode in ("streaming", "device-map"):
            if mode in results:
                r = results[mode]
                print(f"{mode}: {gib(r['bytes_read_counted'])} tensor bytes read from the checkpoint by our reader, "
                      f"offloaded (activations / layers): {r['offloaded']}, seconds: {r['seconds']}")
        print(f"outputs identical to {modes[-1]} (tensors, groups): {identical}")
        if args.json:
            Path(args.json).write_text(json.dumps({"checkpoint_bytes": size, "results": results,
                                                   "identical": identical}, indent=2))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
