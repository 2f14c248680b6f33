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
    """The compression settings and the compressed layers, on model.config: {"method", "layers"} while every
    compressed layer shares one method, else {"methods": {layer: method}, "layers"} (layers compressed in calls
    with different settings)."""
    config = getattr(model, "config", None)
    if config is None:
        return
    methods = compression_methods(getattr(config, COMPRESS_SECTION, None) or {})
    methods.update(dict.fromkeys(layer_names, method))
    setattr(config, COMPRESS_SECTION, compression_section(methods))


def compression_methods(section: dict) -> dict[str, dict]:
    """{layer: its compression method} from a compression section."""
    if "methods" in section:
        return dict(section["methods"])
    return dict.fromkeys(section.get("layers", []), section.get("method"))


def compression_section(methods: dict[str, dict]) -> dict:
    """The compression section of {layer: method} (see record_compression)."""
    layers = sorted(methods)
    first = methods[layers[0]] if layers else None
    if all(m == first for m in methods.values()):
        return {"method": first, "layers": layers}
    return {"methods": {n: methods[n] for n in layers}, "layers": layers}
