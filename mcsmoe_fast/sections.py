"""What a merged or compressed model records about itself: a JSON-ready section on model.config
(`mcsmoe_merge`, `mcsmoe_compress`) that the checkpoint saves into config.json and reads back."""
from __future__ import annotations

from torch import nn

MERGE_SECTION = "mcsmoe_merge"  # the config attribute (and config.json key) describing the merges
COMPRESS_SECTION = "mcsmoe_compress"  # the same for compression


def record_merge(model: nn.Module, groupings: dict, stats: dict, method: dict) -> None:
    """Append one merge (its settings, each layer's grouping and statistics summary) to model.config."""
    config = getattr(model, "config", None)
    if config is None:
        return
    section = dict(getattr(config, MERGE_SECTION, None) or {})
    merges = list(section.get("merges", []))
    merges.append({"method": method, "layers": {n: g.to_dict() for n, g in groupings.items()},
                   "statistics": {n: stats[n].summary() for n in groupings}})
    section["merges"] = merges
    setattr(config, MERGE_SECTION, section)


def record_compression(model: nn.Module, layer_names, method: dict) -> None:
    """The compression settings and the compressed layers, on model.config."""
    config = getattr(model, "config", None)
    if config is not None:
        setattr(config, COMPRESS_SECTION, {"method": method, "layers": sorted(layer_names)})
