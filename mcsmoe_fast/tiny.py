"""Small randomly initialised MoE models of every supported family, built from configs (no download).

Used by the quick start, the tests and the benchmarks; a saved tiny model loads through exactly the
code that loads a hub checkpoint.
"""
from __future__ import annotations

import torch


def tiny_switch(num_experts: int = 8, d_model: int = 32, d_ff: int = 64, num_layers: int = 4,
                expert_capacity: int = 64, seed: int = 0, dense_act_fn: str = "relu"):
    from transformers import SwitchTransformersConfig, SwitchTransformersForConditionalGeneration

    torch.manual_seed(seed)
    config = SwitchTransformersConfig(
        vocab_size=128, d_model=d_model, d_kv=8, d_ff=d_ff, num_layers=num_layers,
        num_decoder_layers=num_layers, num_heads=4, num_experts=num_experts,
        num_sparse_encoder_layers=num_layers // 2, num_sparse_decoder_layers=num_layers // 2,
        expert_capacity=expert_capacity, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
        dense_act_fn=dense_act_fn,
    )
    return SwitchTransformersForConditionalGeneration(config).eval()


def tiny_mixtral(num_experts: int = 8, hidden_size: int = 32, intermediate_size: int = 64,
                 num_layers: int = 2, top_k: int = 2, seed: int = 0, hidden_act: str = "silu"):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    config = MixtralConfig(
        vocab_size=128, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
        num_local_experts=num_experts, num_experts_per_tok=top_k, max_position_embeddings=256,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, hidden_act=hidden_act,
    )
    return MixtralForCausalLM(config).eval()


# family -> (config class, model class, config fields beyond the common ones); E experts, top-k, ff are
# filled in by tiny_moe under each family's own names
_FAMILIES = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {}),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(shared_expert_intermediate_size=40, intermediate_size=40, norm_topk_prob=False)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(intermediate_size=40, head_dim=8, norm_topk_prob=True)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", {}),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                    dict(n_group=2, topk_group=1, first_k_dense_replace=1, n_shared_experts=1, intermediate_size=40,
                         kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
                         num_key_value_heads=4, routed_scaling_factor=2.5,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM", dict(head_dim=8, sliding_window=16, rope_parameters={
        "rope_type": "default", "rope_theta": 10000.0})),
    "qwen3_next": ("Qwen3NextConfig", "Qwen3NextForCausalLM",
                   dict(shared_expert_intermediate_size=40, intermediate_size=40, head_dim=8, linear_num_value_heads=4,
                        linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8)),
    "qwen3_5_moe": ("Qwen3_5MoeTextConfig", "Qwen3_5MoeForCausalLM",
                    dict(shared_expert_intermediate_size=40, head_dim=8, linear_num_value_heads=4,
                         linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8)),
    # Llama-4 text: sigmoid top-k router scaling the expert's input, a shared expert, MoE on every 2nd layer
    # (the others dense MLPs of intermediate_size_mlp); chunked attention (8 tokens) and NoPE every 4th
    # layer run on CPU; weights at std 0.1 so the routed experts weigh in the logits
    "llama4_text": ("Llama4TextConfig", "Llama4ForCausalLM",
                    dict(head_dim=8, intermediate_size_mlp=40, interleave_moe_layer_step=2, attention_chunk_size=8,
                         initializer_range=0.1, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
}
OWN_LAYOUT_FAMILIES = ("llama4_text",)  # own adapter (models/llama4.py), not on the experts contract
FAMILY_NAMES = tuple(f for f in _FAMILIES if f not in OWN_LAYOUT_FAMILIES)  # the experts-contract families
_EXPERT_FIELDS = {  # (experts, ff) field names where they differ from Mixtral's
    "qwen2_moe": ("num_experts", "moe_intermediate_size"), "qwen3_moe": ("num_experts", "moe_intermediate_size"),
    "olmoe": ("num_experts", "intermediate_size"), "deepseek_v3": ("n_routed_experts", "moe_intermediate_size"),
    "qwen3_next": ("num_experts", "moe_intermediate_size"), "qwen3_5_moe": ("num_experts", "moe_intermediate_size"),
}


def tiny_moe(family: str, num_experts: int = 8, hidden_size: int = 32, intermediate_size: int = 48,
             num_layers: int = 2, top_k: int = 2, seed: int = 0, **overrides):
    """A tiny causal LM of `family` (one of FAMILY_NAMES or OWN_LAYOUT_FAMILIES) with random weights, in eval
    mode. Every layer is an MoE layer except DeepSeek-V3's first (dense, as configured by first_k_dense_replace)
    and Llama-4's even ones (2 * num_layers layers, MoE on the odd ones: num_layers MoE layers);
    Qwen3-Next and Qwen3.5-MoE alternate linear and full attention. GPT-OSS's expert biases are random too."""
    import transformers

    if family not in _FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose from {', '.join(_FAMILIES)}")
    config_cls, model_cls, extra = _FAMILIES[family]
    experts_field, ff_field = _EXPERT_FIELDS.get(family, ("num_local_experts", "intermediate_size"))
    layers = {"deepseek_v3": num_layers + 1, "llama4_text": 2 * num_layers}.get(family, num_layers)  # dense layers too
    fields = dict(vocab_size=128, hidden_size=hidden_size, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1,
                  eos_token_id=2, num_experts_per_tok=top_k)
    fields.update(extra)
    fields[experts_field], fields[ff_field] = num_experts, intermediate_size
    if family in ("qwen3_next", "qwen3_5_moe"):
        fields["layer_types"] = ["linear_attention" if (i + 1) % 2 else "full_attention" for i in range(layers)]
    fields.update(overrides)
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**fields)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("_proj_bias") or name.endswith("e_score_correction_bias"):
                p.normal_(0, 0.05)  # initialised to zero: give biases a value that matters in tests
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0, 0.05)
    return model


TINY_WORDS = ("the quick brown fox jumps over a lazy dog experts share merged weights routers still score every "
              "original expert mixture of models are sparse and large calibration text decides which dominate "
              "positive negative")  # SST-2's label words: label scoring needs choices the tokenizer tells apart


def tiny_tokenizer(words: str = TINY_WORDS):
    """A word-level tokenizer over `words` (plus [PAD], [EOS], [UNK]), built locally; vocabulary < 128 so it
    fits the tiny models."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([words], trainers.WordLevelTrainer(special_tokens=["[PAD]", "[EOS]", "[UNK]"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", eos_token="[EOS]", unk_token="[UNK]")
