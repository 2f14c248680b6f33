"""Small randomly initialised Switch and Mixtral models built from configs (no download).

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


TINY_WORDS = ("the quick brown fox jumps over a lazy dog experts share merged weights routers still score every "
              "original expert mixture of models are sparse and large calibration text decides which dominate")


def tiny_tokenizer(words: str = TINY_WORDS):
    """A word-level tokenizer over `words` (plus [PAD], [EOS], [UNK]), built locally; vocabulary < 128 so it
    fits the tiny models."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([words], trainers.WordLevelTrainer(special_tokens=["[PAD]", "[EOS]", "[UNK]"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", eos_token="[EOS]", unk_token="[UNK]")
