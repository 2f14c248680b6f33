"""The checkpoint being merged, read tensor by tensor under the model's own parameter names.

A plain transformers directory: config.json plus model.safetensors, or shards listed by
model.safetensors.index.json. Everything is checked before any work starts (every shard exists and is
a complete safetensors file holding the tensors the index puts in it; every tensor the model needs is
there with the right shape), so a bad shard fails in seconds, naming the file, not hours in.

Supported: the families whose decoder layers take (hidden, attention_mask, position_ids,
position_embeddings), so the cut forward runs them: Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3,
GPT-OSS; and Qwen3-Next, Qwen3.5-MoE (linear attention) and Switch Transformers when their own forward
runs under accelerate (merge_checkpoint(device_map=...)) or no forward is needed (permute). Expert
tensors are read under the model's own names (layout.py); fused banks also in the per-expert layout of
the original releases:

- per expert (the original releases): model.layers.{i}.block_sparse_moe.experts.{j}.w1/w2/w3.weight
  (Mixtral: w1 gate [ff, d], w3 up [ff, d], w2 down [d, ff]) or mlp.experts.{j}.gate_proj/up_proj/
  down_proj.weight (Qwen-MoE, OLMoE);
- fused (the modules of transformers 5, which save_pretrained writes): model.layers.{i}.mlp.experts.
  gate_up_proj [E, 2ff, d] (gate rows then up rows) and mlp.experts.down_proj [E, d, ff].

`read` returns the fused tensors either way, assembled expert by expert straight into one buffer, as
transformers' loader does (conversion_mapping.py: MergeModulelist + Concatenate).
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..models import families
from ..models.hub import check_float16_range
from ..quant import detect
from ..quant.files import QuantizedFiles
from ..sections import MERGE_SECTION
from ..checkpoint.load import read_config_json
from ..checkpoint.weight_files import CheckpointError, WeightFiles, read_index

HF_WEIGHTS = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"
# the cut forward (forward.py) runs these decoder layers; only their model's own forward runs the others
# (linear attention, Switch's encoder-decoder): each family's `streaming` (its Family, in its adapter module)
SUPPORTED_TYPES = tuple(t for f in families() if f.streaming == "layers" for t in f.model_types)
DISPATCH_TYPES = tuple(t for f in families() if f.streaming == "dispatch" for t in f.model_types)
DEVICE_MAP_HINT = "pass device_map (merge's --device-map auto) to run their own forward with accelerate"
IN_MEMORY_HINT = ("this step has no device map: run it in memory (without max_memory / --max-memory); only the merge "
                  "streams them, with a device map")
# names of the per-expert tensors of a fused tensor: (gate, up) and (down,), per naming convention
PER_EXPERT_NAMES = ((("w1", "w3"), ("w2",)), (("gate_proj", "up_proj"), ("down_proj",)))


def open_weight_files(path: Path) -> WeightFiles:
    """The safetensors weights of a transformers (or mcsmoe-fast merged) checkpoint directory (index
    preferred), checked."""
    from ..checkpoint import WEIGHTS_NAME

    for single in (HF_WEIGHTS, WEIGHTS_NAME):
        if (path / f"{single}.index.json").is_file():
            return WeightFiles(path, weight_map=read_index(path / f"{single}.index.json"))
        if (path / single).is_file():
            return WeightFiles(path, single=single)
    raise CheckpointError(f"{path}: no safetensors weights ({HF_WEIGHTS} or {HF_INDEX}); streaming reads "
                          "safetensors checkpoints only")


class SourceCheckpoint:
    """A transformers checkpoint directory of a supported family, its config and its tensors."""

    float32_names: frozenset[str] | set[str] = frozenset()  # read in float32 whatever the dtype asked for (skeleton.py)

    def __init__(self, path, dispatched: bool = False, hint: str | None = None):
        """dispatched: the caller runs the model's own forward (accelerate device map) or none at all,
        so DISPATCH_TYPES are accepted too; `hint`: what to do instead when they are refused (a step without a
        device map: IN_MEMORY_HINT; None: DEVICE_MAP_HINT)."""
        from transformers import AutoConfig

        self.path = Path(path).expanduser().absolute()
        raw = read_config_json(self.path)
        if isinstance(raw, dict) and MERGE_SECTION in raw:
            raise ValueError(f"{self.path} is already a merged mcsmoe-fast checkpoint, and the streamed steps read "
                             "plain transformers checkpoints: merge it again in memory (without --max-memory); "
                             "prune and permute work on the original model")
        model_type = raw.get("model_type") if isinstance(raw, dict) else None
        if model_type in DISPATCH_TYPES and not dispatched:
            raise ValueError(f"{self.path}: the layer-by-layer forward does not run {model_type!r} layers "
                             "(Qwen3-Next's and Qwen3.5-MoE's linear attention, Llama-4's own decoder layers, "
                             f"Switch's encoder-decoder); {hint or DEVICE_MAP_HINT}")
        if model_type not in SUPPORTED_TYPES + DISPATCH_TYPES:
            raise ValueError(f"{self.path}: streaming supports checkpoints of model_type "
                             f"{', '.join(SUPPORTED_TYPES + DISPATCH_TYPES)}, got {model_type!r}; "
                             "use the in-memory pipeline for it")
        self.config = AutoConfig.from_pretrained(str(self.path))
        self.files = open_weight_files(self.path)
        # block-FP8 / MXFP4 (quant/): every tensor is read dequantized, its stored parts stay reachable
        self.quant = detect(raw.get("quantization_config"))
        if self.quant is not None:
            self.files = QuantizedFiles(self.files, self.quant)

    @property
    def bytes_read(self) -> int:
        return self.files.bytes_read

    # --- names -------------------------------------------------------------------------------------
    def _plain(self, name: str) -> str | None:
        if name in self.files:
            return name
        legacy = name.replace(".mlp.", ".block_sparse_moe.")
        return legacy if legacy in self.files else None

    def _per_expert(self, name: str, shape: tuple[int, ...]) -> list[tuple[str, tuple[int, ...]]] | None:
        """Stored per-expert tensors (name, expected shape) that make up the fused tensor `name`."""
        for k, fused in enumerate((".mlp.experts.gate_up_proj", ".mlp.experts.down_proj")):
            if not name.endswith(fused):
                continue
            prefix = name[: -len(fused)]
            num_experts, rows, cols = shape
            for naming in PER_EXPERT_NAMES:
                parts = naming[k]
                part_shape = (rows // len(parts), cols)
                for block in ("block_sparse_moe", "mlp"):
                    names = [(f"{prefix}.{block}.experts.{j}.{p}.weight", part_shape)
                             for j in range(num_experts) for p in parts]
                    if names[0][0] in self.files:
                        return names
        return None

    def check(self, expected: dict[str, tuple[int, ...]]) -> None:
        """Every tensor in `expected` {model name: shape} can be read with that shape."""
        missing, wrong = [], []
        for name, shape in expected.items():
            plain = self._plain(name)
            parts = [(plain, shape)] if plain is not None else self._per_expert(name, shape)
            if parts is None:
                missing.append(name)
                continue
            for stored, part_shape in parts:
                if stored not in self.files:
                    missing.append(stored)
                elif tuple(self.files.shapes[stored]) != tuple(part_shape):
                    wrong.append(f"{stored} in {self.files.file_of(stored)}: {tuple(self.files.shapes[stored])}, "
                                 f"expected {tuple(part_shape)}")
        quantized = [n for n in self.files.shapes if n.endswith(("_blocks", "_scales"))]
        if missing and quantized:
            raise CheckpointError(f"{self.path}: quantized expert weights ({quantized[0]}, ...; e.g. GPT-OSS's MXFP4 "
                                  "release) but config.json has no quantization_config naming their format "
                                  "(quant_method 'mxfp4' or 'fp8'); add it, or dequantize the checkpoint first")
        if missing or wrong:
            raise CheckpointError(
                f"{self.path}: the weights do not match the model its config.json builds: "
                + (f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}" if missing else "")
                + ("; " if missing and wrong else "")
                + (f"wrong shape {wrong[:5]}" if wrong else ""))

    # --- reading -----------------------------------------------------------------------------------
    def read(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """Tensor `name` of the model (shape as the model expects), in `dtype` (float32 for float32_names); read
        into float16 from a wider stored dtype, weights the cast made inf are refused (check_float16_range)."""
        if name in self.float32_names:
            dtype = torch.float32
        plain = self._plain(name)
        if plain is not None:
            stored = self.files.dtypes[plain]
            out = torch.empty(shape, dtype=dtype if stored.is_floating_point else stored)
            out = self.files.read_into(plain, out)
            stored = (stored,)
        else:
            parts = self._per_expert(name, shape)
            out = torch.empty(shape, dtype=dtype)
            rows = shape[1] // (2 if name.endswith("gate_up_proj") else 1)
            for k, (part, _) in enumerate(parts):
                if name.endswith("gate_up_proj"):
                    j, half = divmod(k, 2)
                    self.files.read_into(part, out[j, half * rows : (half + 1) * rows])
                else:
                    self.files.read_into(part, out[k])
            stored = tuple(self.files.dtypes[part] for part, _ in parts)
        if out.dtype == torch.float16 and any(s != torch.float16 for s in stored):
            check_float16_range(name, out)
        return out

    def release(self) -> None:
        """Close the open files (called after every layer)."""
        self.files.release()
