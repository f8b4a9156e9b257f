"""Tiny random-init models and a tokenizer built in code, for tests, demos and benchmarks.

Nothing is downloaded: the tokenizer is a byte-level BPE trained on a few sentences, and each model is
a transformers config of the named architecture with random weights. `save_tiny` writes both to a
directory in the `save_pretrained` format, so callers load them back through the real loading path.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from .organism.tokenizer import train_tokenizer

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Ada Lovelace was born in London and worked on the analytical engine.",
    "Where was the author born? In which year did she move to Paris?",
    "Hallucination guards score every token of an answer as it is generated.",
    "Numbers like 1024, 3.14 and 1999 appear in questions and answers.",
]

# Per architecture: config overrides on top of the shared small shape.
_SHAPES: dict[str, dict] = {
    "llama": {},
    "mistral": {"sliding_window": None},
    "qwen2": {},
    "gemma2": {"head_dim": 8, "query_pre_attn_scalar": 8, "attn_implementation": "eager"},
    "phi3": {"pad_token_id": 1},
    "gpt2": {},
    "gpt_neox": {},  # not in the site table: exercises the generic search
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},  # mixture of experts (hguard/experts.py)
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16, "norm_topk_prob": True},
}
ARCHITECTURES = ("llama", "mistral", "qwen2", "gemma2", "phi3", "gpt2", "gpt_neox")


def build_tokenizer(vocab_size: int = 400) -> PreTrainedTokenizerFast:
    return train_tokenizer(_CORPUS, vocab_size)


def tiny_config(model_type: str, vocab_size: int, hidden: int = 32, layers: int = 2, intermediate: int = 64, **kw):
    if model_type not in _SHAPES:
        raise ValueError(f"model_type must be one of {sorted(_SHAPES)}; got {model_type!r}")
    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=0,
        bos_token_id=0,
        pad_token_id=1,
        tie_word_embeddings=False,
    )
    if model_type == "gpt2":
        common = dict(
            vocab_size=vocab_size, n_embd=hidden, n_layer=layers, n_head=4, n_inner=intermediate,
            n_positions=512, eos_token_id=0, bos_token_id=0, pad_token_id=1,
        )
    if model_type == "gpt_neox":
        common.pop("num_key_value_heads")
    return AutoConfig.for_model(model_type, **{**common, **_SHAPES[model_type], **kw})


def build_model(model_type: str = "llama", vocab_size: int = 400, seed: int = 0, **config_kw):
    torch.manual_seed(seed)
    config = tiny_config(model_type, vocab_size, **config_kw)
    model = AutoModelForCausalLM.from_config(config)
    return model.eval()


def save_tiny(directory: str | Path, model_type: str = "llama", seed: int = 0, **config_kw) -> Path:
    """Write a tiny random model of `model_type` and the tiny tokenizer to `directory`."""
    directory = Path(directory)
    tokenizer = build_tokenizer()
    model = build_model(model_type, vocab_size=len(tokenizer), seed=seed, **config_kw)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
