"""Expert bytes of a Switch-base-32-shaped model (12 MoE layers x 32 experts, d 768, ff 3072, fp32):
original vs merged to 8 slots per layer vs merged and compressed (rank 32, keep 10%), on disk and
resident after loading.

Run:  python benchmarks/report_compressed_size.py     (about a minute, ~5 GB of memory, ~1 GB of disk)

The original's expert bytes are the bytes of its expert tensors (what its checkpoint and memory hold:
E x (wi + wo) per layer); building and saving that 7 GB model adds nothing but time. The merged model
is built without ever allocating the original experts (8 random slots per layer, expert_map e -> e // 4),
compressed, saved with save_pretrained, and loaded back with from_pretrained in a fresh process, where
the resident memory is read from /proc/self/status (RssAnon: memory the process owns, not the page cache
of the memory-mapped weights file) before and after loading.
Goal (issue 8): compressed expert bytes, on disk and resident, <= 5% of the original's.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

D, FF, E, G, LAYERS = 768, 3072, 32, 8, 12


def switch_base_32_config():
    from transformers import SwitchTransformersConfig

    return SwitchTransformersConfig(
        vocab_size=32128, d_model=D, d_kv=64, d_ff=FF, num_layers=12, num_decoder_layers=12, num_heads=12,
        num_experts=E, num_sparse_encoder_layers=6, num_sparse_decoder_layers=6, expert_capacity=64,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )


def merged_model():
    """The model with 8 random slots per MoE layer; the 32 original experts are never materialised."""
    from transformers import SwitchTransformersForConditionalGeneration
    from transformers.initialization import no_init_weights

    from mcsmoe_fast import moe_layers
    from mcsmoe_fast.modules import MoEExperts

    with no_init_weights():  # untouched torch.empty pages: the original experts cost no memory
        model = SwitchTransformersForConditionalGeneration(switch_base_32_config()).eval()
    model.tie_weights()  # built under no_init_weights, the embeddings the config ties are not tied yet
    gen = torch.Generator().manual_seed(0)
    for name, p in model.named_parameters():
        if ".experts." not in name:  # the experts are replaced below: their pages are never written
            p.data.normal_(0, 0.02, generator=gen) if p.dim() > 1 else p.data.fill_(1.0)
    layers = moe_layers(model)
    assert len(layers) == LAYERS
    for layer in layers:
        w_in = torch.randn(G, FF, D, generator=gen) * D**-0.5
        w_out = torch.randn(G, D, FF, generator=gen) * FF**-0.5
        layer.install_experts(MoEExperts(w_in, w_out, torch.arange(E) // (E // G), "relu"))
    return model


def expert_bytes_on_disk(path: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(path / "mcsmoe_model.safetensors"), "pt") as f:
        return sum(f.get_tensor(k).nbytes
                   for k in f.keys() if ".experts." in k)


LOAD_AND_MEASURE = r"""
import gc, json, sys, torch
def rss():  # anonymous resident memory: what the process holds, not the page cache of mapped files
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
import mcsmoe_fast
before = rss()
model = mcsmoe_fast.from_pretrained(sys.argv[1])
gc.collect()
after = rss()
def held_bytes(keep):  # the storages the model holds (its state_dict would present E experts per merged layer)
    held = list(model.named_parameters()) + list(model.named_buffers())
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for n, t in held if keep(n)}.values())
experts, total = held_bytes(lambda n: ".experts." in n), held_bytes(lambda n: True)
print(json.dumps({"rss_delta": after - before, "expert_tensor_bytes": experts, "model_tensor_bytes": total}))
"""


def measure_loaded(path: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", LOAD_AND_MEASURE, str(path)], check=True, capture_output=True,
                         text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    from mcsmoe_fast import compress_experts, save_pretrained

    original = LAYERS * E * 2 * D * FF * 4
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = merged_model()
        merged_path = save_pretrained(model, Path(tmp) / "merged")
        rows.append(("merged, 8 slots", expert_bytes_on_disk(merged_path), measure_loaded(merged_path)))
        compress_experts(model, rank=32, keep_ratio=0.1)
        path = save_pretrained(model, Path(tmp) / "compressed")
        rows.append(("merged + compressed (r 32, keep 10%)", expert_bytes_on_disk(path), measure_loaded(path)))
    print(f"\noriginal expert bytes (12 x 32 experts x (wi + wo), fp32): {original / 2**20:,.1f} MiB")
    print(f"{'model':<38} {'experts on disk':>16} {'share':>7} {'experts resident':>17} {'share':>7} "
          f"{'RSS growth on load':>19} {'all tensors':>12}")
    for name, disk, loaded in rows:
        print(f"{name:<38} {disk / 2**20:>12,.1f} MiB {disk / original:>7.2%} "
              f"{loaded['expert_tensor_bytes'] / 2**20:>13,.1f} MiB {loaded['expert_tensor_bytes'] / original:>7.2%} "
              f"{loaded['rss_delta'] / 2**20:>15,.1f} MiB {loaded['model_tensor_bytes'] / 2**20:>8,.1f} MiB")


if __name__ == "__main__":
    main()
