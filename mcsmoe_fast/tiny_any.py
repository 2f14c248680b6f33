"""A tiny random model of any transformers model type, built from its config class's defaults by one generic
shrinking (no per-family table): every size a config names is cut to a few units, the layer count to the
shortest prefix that still holds every kind of layer the config lists, and the experts to 8 of which 2 are
chosen. Deterministic (seeded) and quick; used to walk every family transformers has
(tests/test_contract_families.py).
"""
from __future__ import annotations

import torch

HIDDEN, FF, EXPERTS, TOP_K, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 32, 16, 8, 2, 4, 2, 8, 128
MAX_LAYERS = 8
MAX_PARAMETERS = 2_000_000  # a shrinking that missed a size fails loudly instead of building a large model

# config attribute -> its tiny value (only where the default is larger; an attribute a config lacks is left out)
_SIZES = {
    **dict.fromkeys(("vocab_size", "unpadded_vocab_size", "vocab_size_per_layer_input"), VOCAB),
    **dict.fromkeys(("hidden_size", "d_model", "text_hidden_size", "ple_embed_dim", "hidden_size_per_layer_input",
                     "router_hidden_size", "hc_lowrank"), HIDDEN),
    **dict.fromkeys(("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts",
                     "num_routed_experts"), EXPERTS),
    **dict.fromkeys(("num_experts_per_tok", "moe_topk", "moe_k", "top_k", "top_k_experts"), TOP_K),
    "moe_intermediate_size": FF,
    **dict.fromkeys(("num_attention_heads", "swa_num_attention_heads", "linear_num_heads", "linear_num_value_heads",
                     "mamba_n_heads", "mamba_num_heads", "index_n_heads", "index_num_heads", "num_heads"), HEADS),
    **dict.fromkeys(("num_key_value_heads", "swa_num_key_value_heads", "linear_num_key_heads"), KV_HEADS),
    **dict.fromkeys(("head_dim", "swa_head_dim", "linear_head_dim", "linear_key_head_dim", "linear_value_head_dim",
                     "index_head_dim", "v_head_dim", "qk_nope_head_dim",
                     "qk_rope_head_dim", "rotary_dim", "d_rel"), HEAD_DIM),
    "qk_head_dim": 2 * HEAD_DIM,
    **dict.fromkeys(("kv_lora_rank", "q_lora_rank", "o_lora_rank", "loop_gate_rank"), 16),
    **dict.fromkeys(("mamba_d_state", "ssm_state_size"), 8),
    "mamba_dt_rank": 4,
    **dict.fromkeys(("mamba_chunk_size", "chunk_size", "block_size", "index_block_size"), 16),
    **dict.fromkeys(("mamba_head_dim", "mamba_d_head"), 2 * HIDDEN // HEADS),  # mamba: expand (2) * d = heads * dim
    **dict.fromkeys(("n_groups", "mamba_n_groups"), 1),
    **dict.fromkeys(("attn_layer_period", "expert_layer_period"), 2),
    **dict.fromkeys(("attn_layer_offset", "expert_layer_offset"), 1),
    "n_shared_experts": 1, "n_group": 2, "topk_group": 1, "zero_expert_num": 2, "index_topk": 16,
    "sliding_window": 16, "sliding_window_size": 16, "attention_chunk_size": 16,
}
_INTERMEDIATE = ("intermediate_size", "ffn_hidden_size", "moe_hidden_size")  # any attribute containing one: FF
_LAYER_COUNTS = ("num_hidden_layers", "num_layers")
# leading dense layers before the first MoE layer: one kept, so that dense layers are left alone is tested
_DENSE_PREFIX = ("first_k_dense_replace", "moe_layer_start_index", "num_dense_layers")


def _per_layer_lists(values: dict, count: int) -> dict[str, list]:
    return {k: v for k, v in values.items() if isinstance(v, list) and len(v) == count and k != "architectures"}


def _layers(values: dict, count: int) -> int:
    """The shortest prefix of the per-layer lists holding each kind of layer they name (at least 2 layers, 3
    with a leading dense layer)."""
    n = 2 + min(1, max([int(values.get(k) or 0) for k in _DENSE_PREFIX if isinstance(values.get(k), int)], default=0))
    for per_layer in _per_layer_lists(values, count).values():
        try:
            n = max(n, 1 + max(per_layer.index(kind) for kind in dict.fromkeys(per_layer)))
        except TypeError:  # unhashable entries
            continue
    return min(n, MAX_LAYERS)


_ALWAYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "num_routed_experts")
_WHEN_UNSET = ("num_experts_per_tok", "moe_topk", "moe_k", "top_k_experts", "head_dim", "n_shared_experts",
               "moe_intermediate_size")
_MOE_SWITCHES = ("enable_moe_block", "use_moe")  # off by default in some configs: the experts are what we test  # None defaults the modeling file needs


def _tiny_value(key: str, value, defaults: dict):
    if key in _MOE_SWITCHES and value is False:
        return True
    if key in _ALWAYS and isinstance(value, int) or value is None and key in _ALWAYS + _WHEN_UNSET:
        return _SIZES[key]  # every family on 8 experts (defaults of 1 or 7 too; None where the modeling needs one)
    if key == "rope_parameters" and isinstance(value, dict) and isinstance(value.get("mrope_section"), list):
        section = value["mrope_section"]  # sums to the rotary half-dimension
        half = int(HEAD_DIM * value.get("partial_rotary_factor", 1.0)) // 2
        return {**value, "mrope_section": [half - len(section) + 1] + [1] * (len(section) - 1)}
    if isinstance(value, bool) or not isinstance(value, int):
        return value
    if key.endswith(("token_id", "token_index")) and value >= VOCAB:
        return {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}.get(key, VOCAB - 1)
    if key == "num_key_value_heads" and value == defaults.get("num_attention_heads"):
        return HEADS  # multi-head (not grouped) attention stays so
    tiny = _SIZES.get(key, FF if any(s in key for s in _INTERMEDIATE) else None)
    return tiny if tiny is not None and value > tiny else value


def shrink(config_cls):
    """An instance of `config_cls` with every size its defaults name cut down: the shrunk defaults are passed
    to the constructor, so whatever the config derives from them (head_dim, layer_types...) follows."""
    import dataclasses

    default = config_cls()
    derived = {**default.to_dict(), **vars(default)}  # with what __post_init__ computed, for the layer kinds
    given = ({f.name: derived.get(f.name, f.default) for f in dataclasses.fields(config_cls)}
             if dataclasses.is_dataclass(config_cls) else default.to_dict())
    for key, value in derived.items():  # per-layer lists the config derives: given, truncated below
        if given.get(key, 0) is None and isinstance(value, list) and len(value) == derived.get("num_hidden_layers"):
            given[key] = value
    if isinstance(derived.get("rope_parameters"), dict) and given.get("rope_parameters") is None:
        given["rope_parameters"] = derived["rope_parameters"]
    kwargs = {k: _tiny_value(k, v, given) for k, v in given.items()
              if k not in ("transformers_version", "architectures", "dtype", "id2label", "label2id")}
    for key in _DENSE_PREFIX:
        if isinstance(kwargs.get(key), int) and kwargs[key] > 1:
            kwargs[key] = 1
    for key in _LAYER_COUNTS:
        count = derived.get(key)
        if isinstance(count, int) and not isinstance(count, bool) and count > 2:
            n = _layers({**derived, **{k: kwargs[k] for k in _DENSE_PREFIX if k in kwargs}}, count)
            for name, per_layer in _per_layer_lists(kwargs, count).items():
                kwargs[name] = per_layer[:n]
            kwargs[key] = n
            if isinstance(kwargs.get("moe_layer_end_index"), int):
                kwargs["moe_layer_end_index"] = n - 1
    return config_cls(**kwargs)


def model_class_of(model_type: str):
    """The causal-LM class of `model_type`, else its base model class (None when transformers has neither)."""
    import transformers
    from transformers.models.auto import modeling_auto

    for mapping in (modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, modeling_auto.MODEL_MAPPING_NAMES):
        name = mapping.get(model_type)
        if isinstance(name, (list, tuple)):
            name = name[0]
        if name and hasattr(transformers, name):
            return getattr(transformers, name)
    return None


def tiny_config(model_type: str):
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    return shrink(CONFIG_MAPPING[model_type])


def tiny_from_model_type(model_type: str, seed: int = 0):
    """A tiny random model of `model_type` (its causal-LM class, else its base class) in eval mode, on
    transformers' eager experts. Random values for the biases transformers initialises to zero."""
    cls = model_class_of(model_type)
    if cls is None:
        raise ValueError(f"transformers has no causal-LM nor base model class for {model_type!r}")
    config = tiny_config(model_type)
    with torch.device("meta"):
        sizes = {n: p.numel() for n, p in cls(config).named_parameters()}
    if sum(sizes.values()) > MAX_PARAMETERS:
        largest = sorted(sizes, key=sizes.get, reverse=True)[:3]
        raise ValueError(f"{model_type}: the shrunk config still builds {sum(sizes.values())} parameters "
                         f"(largest: {', '.join(f'{n} {sizes[n]}' for n in largest)})")
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("_bias") and "experts" in name or name.endswith("e_score_correction_bias"):
                p.normal_(0, 0.05)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias") or name.endswith("expert_bias"):
                b.normal_(0, 0.05)
    if hasattr(model, "set_experts_implementation"):
        try:
            model.set_experts_implementation("eager")
        except Exception:  # a class without experts (a vision or audio part) has nothing to set
            pass
    return model
