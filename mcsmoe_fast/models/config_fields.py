"""What a family's config says about its experts, read the same way by every step and export: the expert
count fields (one per family's naming) and the routing groups of a group-limited router."""
from __future__ import annotations

EXPERT_COUNT_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts")  # the config's expert count


def routing_groups(config) -> int:
    """Number of routing groups of a group-limited router (DeepSeek-V3's n_group); 1 for the others."""
    n_group = getattr(config, "n_group", None)
    return int(n_group) if isinstance(n_group, int) and n_group > 1 else 1


def expert_count_fields(config) -> list[str]:
    """The config fields that hold the expert count (an error naming them when there is none)."""
    fields = [f for f in EXPERT_COUNT_FIELDS if isinstance(getattr(config, f, None), int)]
    if not fields:
        raise ValueError(f"the {config.model_type} config has none of {', '.join(EXPERT_COUNT_FIELDS)}: "
                         "cannot read or write its expert count")
    return fields
