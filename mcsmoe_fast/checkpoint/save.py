"""save_pretrained: the merged format (each unique tensor once), the standard format (the family's own
checkpoint with M experts, standard.py) or a dense export (every expert written out).

The weights file deliberately is not named model.safetensors: plain transformers cannot run a merged
model, so its from_pretrained fails loudly instead of loading random experts. `export_dense=True`
writes a plain transformers checkpoint instead (every expert materialised), which vanilla
`from_pretrained` loads.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from torch import nn

from ..models import unwrap
from ..modules import slot_names
from ..sections import COMPRESS_SECTION, compression_methods, compression_section
from .atomic import atomic_directory
from .dense import to_dense
from .standard import to_standard
from .format import WEIGHTS_METADATA, WEIGHTS_NAME, merged_layers, model_dtype, unique_tensors, write_merged_config
from .weight_files import ShardWriter, parse_size


def _write_merged(model: nn.Module, tmp: Path, max_shard_size: int | None = None) -> None:
    layers = merged_layers(model)  # refuses a model still being pruned before anything is written
    with slot_names():  # each merged slot once (a SwitchMoE's plain state dict names every expert)
        tensors, aliases = unique_tensors(model.state_dict())
    writer = ShardWriter(tmp, WEIGHTS_NAME, max_shard_size, WEIGHTS_METADATA)
    for name, tensor in tensors.items():
        writer.add(name, tensor)
    config = model.config.__class__.from_dict(model.config.to_dict())
    compressed = sorted(n for n, entry in layers.items() if "compressed" in entry)
    if getattr(config, COMPRESS_SECTION, None) is not None:  # merged again since: only what is still compressed
        methods = compression_methods(getattr(config, COMPRESS_SECTION))
        if compressed:
            setattr(config, COMPRESS_SECTION, compression_section({n: methods.get(n) for n in compressed}))
        else:
            delattr(config, COMPRESS_SECTION)
    write_merged_config(config, tmp, writer.finish(), aliases, layers, model_dtype(model))
    if getattr(model, "generation_config", None) is not None:  # eos ids, sampling defaults: as the model generates
        model.generation_config.save_pretrained(str(tmp))


def _write_dense(model: nn.Module, tmp: Path, max_shard_size: int | None = None) -> None:
    dense = to_dense(model)
    dense.save_pretrained(str(tmp), **({} if max_shard_size is None else {"max_shard_size": max_shard_size}))


FORMATS = ("exact", "standard")


def refuse_offloaded(model: nn.Module) -> None:
    """ValueError naming the tensors of the state dict on the meta device (offloaded to disk by accelerate's
    device_map, or never loaded): they hold no values to write."""
    meta = [n for n, t in model.state_dict().items() if t.is_meta]
    if meta:
        raise ValueError(f"parameters {', '.join(meta[:5])}{' ...' if len(meta) > 5 else ''} are offloaded (on the "
                         "meta device, no values in memory): load the model without disk offload to save it")


def refuse_untied(model: nn.Module) -> None:
    """ValueError when config.json would tie tensors (transformers' all_tied_weights_keys: {tied name: source})
    that the model holds as different tensors: the checkpoint would load as another model (from_pretrained
    refuses it; transformers would tie them back, dropping one's values)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    for target, source in (getattr(model, "all_tied_weights_keys", None) or {}).items():
        if target in params and source in params and params[target] is not params[source]:
            raise ValueError(f"the config ties {target!r} to {source!r} but the model holds them as different tensors: "
                             "call model.tie_weights() to tie them, or set config.tie_word_embeddings = False to "
                             "keep both")


def save_pretrained(model: nn.Module, save_directory, export_dense: bool = False, tokenizer=None,
                    extra: Callable[[Path], None] | None = None, max_shard_size=None, format: str = "exact",
                    router: str | None = None, batches=None) -> Path:
    """Save `model` (merged or not) to `save_directory` ("~" is the home directory); returns its path.

    Default: the merged format above (unique weights only). export_dense=True: a plain transformers
    checkpoint with every expert materialised (not possible for models with dropped experts: plain
    transformers cannot mask router logits). `tokenizer`, when given, is saved alongside; saved over a previous
    checkpoint, the tokenizer, chat template and generation files there are kept unless this save writes its
    own (its weights, index and config are replaced). `extra(dir)` writes more files into the checkpoint
    before it is moved into place (the trainer's state). A model with tensors on the meta device (offloaded
    to disk), or holding tensors its config ties as different ones, is refused before anything is written.
    max_shard_size: None (one weights file) or bytes (an int or "500MB", "2GiB"...) per shard of the
    merged format (the dense export uses transformers' own sharding, at this size when given).
    format: "exact" (default: the merged format above, all E router rows and the expert_map) or "standard"
    (the family's own transformers checkpoint with M experts and M router rows, which vanilla transformers,
    vLLM and SGLang load: see to_standard; refused before anything is written when the model cannot be
    expressed that way). router, batches: the standard format's router rows ("fitted" on `batches`, the
    default when they are given, or "dominant"); see standard_router.py.
    """
    model = unwrap(model)
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    if format == "standard" and export_dense:
        raise ValueError("export_dense=True writes every expert (E per layer); format='standard' writes the M merged "
                         "experts: choose one")
    if format != "standard" and (router is not None or batches is not None):
        raise ValueError("router and batches choose the router rows of format='standard' only")
    shard = parse_size(max_shard_size, "max_shard_size")
    refuse_offloaded(model)
    refuse_untied(model)
    standard = to_standard(model, router=router, batches=batches) if format == "standard" else None
    target = Path(save_directory).expanduser().absolute()
    with atomic_directory(target) as tmp:
        if standard is not None:
            standard.save_pretrained(str(tmp), **({} if shard is None else {"max_shard_size": shard}))
        elif export_dense:
            _write_dense(model, tmp, shard)
        else:
            _write_merged(model, tmp, shard)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if extra is not None:
            extra(tmp)
    return target
