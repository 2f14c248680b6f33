"""One-shot compression (compress.py, importance="weight") when the layers arrive one at a time.

compress_experts prunes the sparse rows of every layer with ONE threshold over the whole model, so no
layer's kept rows are known before every layer has been decomposed. Each layer's full bank (low-rank
factors plus every residual row) is therefore staged in a file while only its row scores stay in
memory; once all layers are in, global_keep draws the same threshold compress_experts draws (same
scores, same module order), and each staged layer is read back, pruned, finalized and written.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from ..checkpoint import layer_entry
from ..compress import IMPORTANCE, CompressOptions, full_bank, global_keep, row_scores
from ..modules.compressed import BANK_FIELDS, CompressedMoEExperts
from ..checkpoint.weight_files import ShardWriter, WeightFiles


def compress_options(compress) -> dict | None:
    """Check `compress`: None or {"rank": int >= 1, "keep_ratio": (0, 1], "svd": ..., "importance": "weight"}."""
    if compress is None:
        return None
    if not isinstance(compress, dict):
        raise ValueError(f"compress must be None or a dict(rank=..., keep_ratio=...), got {compress!r}")
    unknown = sorted(set(compress) - {"rank", "keep_ratio", "svd", "importance"})
    if unknown:
        raise ValueError(f"compress: unknown options {unknown} (rank, keep_ratio, svd, importance)")
    try:
        opts = CompressOptions(**compress).to_dict()
    except ValueError as exc:
        raise ValueError(f"compress: {exc}") from None
    if opts["importance"] != "weight":
        others = ", ".join(i for i in IMPORTANCE if i != "weight")
        raise ValueError(f"compress: streaming compresses one-shot with importance='weight' only ({others} need "
                         "calibration through the merged model or fine-tuning: use the in-memory pipeline)")
    return opts


class CompressionStage:
    """Layers' compressed banks staged in `directory` until the global threshold is known."""

    def __init__(self, directory: Path, rank: int, keep_ratio: float, svd: str = "auto"):
        self.directory, self.rank, self.keep_ratio, self.svd = Path(directory), rank, keep_ratio, svd
        self.directory.mkdir(parents=True, exist_ok=True)
        # (name, file, activation, keep, activation_args)
        self.layers: list[tuple[str, str, str, torch.Tensor | None, dict]] = []
        self.scores: list[torch.Tensor] = []
        self.lengths: list[int] = []

    @torch.no_grad()
    def add(self, name: str, w_in: torch.Tensor, w_out: torch.Tensor, expert_map: torch.Tensor, activation: str,
            keep: torch.Tensor | None = None, b_in: torch.Tensor | None = None, b_out: torch.Tensor | None = None,
            activation_args: dict | None = None) -> None:
        """Decompose one layer's slots (w_in [S, F, d], w_out [S, d, ff]; biases b_in [S, F], b_out [S, d]
        kept dense) and stage them."""
        from safetensors.torch import save_file

        module = CompressedMoEExperts(full_bank(w_in, self.rank, self.svd), full_bank(w_out, self.rank, self.svd),
                                      expert_map.clone(), activation, b_in, b_out, activation_args)
        for side in ("in", "out"):
            self.scores.append(row_scores(module, side, None))
            self.lengths.append(getattr(module, f"{side}_S_rows").shape[1])
        file = f"{len(self.layers):05d}.safetensors"
        save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(self.directory / file))
        self.layers.append((name, file, activation, keep, module.activation_args))

    @torch.no_grad()
    def finish(self, writer: ShardWriter, progress=None) -> dict[str, dict]:
        """Prune every staged layer with the global threshold and write it; returns the layers'
        config entries (checkpoint.layer_entry)."""
        masks = iter(global_keep(self.scores, self.lengths, self.keep_ratio))
        entries = {}
        for name, file, activation, keep, activation_args in self.layers:
            staged = WeightFiles(self.directory, single=file)
            state = {k: staged.get(k) for k in staged.shapes}
            staged.release()
            banks = [[state[f"{side}_{f}"] for f in BANK_FIELDS] for side in ("in", "out")]
            module = CompressedMoEExperts(banks[0], banks[1], state["expert_map"], activation, state.get("b_in"),
                                          state.get("b_out"), activation_args)
            module.set_keep(next(masks), next(masks))
            module.finalize()
            for k, v in module.state_dict().items():
                writer.add(f"{name}.experts.{k}", v)
            entries[name] = layer_entry(module.num_experts, activation, module, keep)
            (self.directory / file).unlink()
            if progress is not None:
                progress(name)
        shutil.rmtree(self.directory, ignore_errors=True)
        return entries
