"""The conformance matrix: every causal-LM `model_type` transformers' auto mapping has, and what hguard does
with it. A type either passes (tests/test_conformance_matrix.py proves streamed == teacher-forced scores
and the four actions' invariants on a tiny random config of it) or `resolve` refuses it with an
`UnsupportedModelError` naming the type and the reason; a few cannot be built from a config alone
(`NOT_BUILT`, each with its reason). `python -m hguard.conformance --markdown` prints the README's table.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from .sites import UnsupportedModelError, resolve

TYPES: tuple[str, ...] = tuple(sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES))

_VISION = "a vision-language model: needs a vision tower and an image processor"
NOT_BUILT: dict[str, str] = {
    "gemma3": f"{_VISION} (its text model, gemma3_text, is in the matrix)",
    "gemma3n": f"{_VISION} and audio tower (needs timm)",
    "gemma4": f"{_VISION} (its text model, gemma4_text, is in the matrix)",
    "gemma4_unified": f"{_VISION} (its text model, gemma4_unified_text, is in the matrix)",
    "gemma4_unified_assistant": f"{_VISION}",
    "got_ocr2": f"{_VISION}",
    "llama4": f"{_VISION} (its text model, llama4_text, is in the matrix)",
    "mllama": f"{_VISION}",
    "phi4_multimodal": f"{_VISION} and audio tower",
    "qwen3_5": f"{_VISION} (its text model, qwen3_5_text, is in the matrix)",
    "qwen3_5_moe": f"{_VISION} (its text model, qwen3_5_moe_text, is in the matrix)",
    "qwen4_exp": f"{_VISION} (its text model, qwen4_exp_text, is in the matrix)",
    "dots3_note": f"{_VISION} (its text model, dots3_note_text, is in the matrix)",
    "emu3": "an image-token model: needs its VQ image tokenizer's vocabulary map",
    "git": f"{_VISION}",
    "moss_transcribe_diarize": "a speech model: needs an audio encoder and feature extractor",
    "musicgen": "a text-to-audio model: needs a text encoder and an audio codec",
    "musicgen_melody": "a text-to-audio model: needs a text encoder and an audio codec",
    "cohere_compass_text": "its config does not build in this transformers release, tiny or default (KeyError "
                           "'full_attention' in its rope parameters)",
    "gemma4_assistant": "a draft model for assisted decoding of a gemma4 target; its config validation refuses "
                        "a standalone tiny shape (hidden_size_per_layer_input)",
    "gemma3n_text": "a tiny config trips its own KV-sharing validation (the layer types producing a cache differ "
                    "from those using one); no tiny config found yet",
    "reformer": "needs its own axial position and chunking config (not a KV-cache decoder)",
}

# The shared small shape, and per type what else a tiny config needs (names a config spells its own way,
# sub-configs' fields, layer patterns the default length does not fit). Weights are drawn with std 0.1, so
# that the probe's neurons move a random model's greedy tokens (the actions' invariants need that).
_COMMON = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=512, eos_token_id=0, bos_token_id=0,
               pad_token_id=1, tie_word_embeddings=False, initializer_range=0.1)
_BART = dict(decoder_layers=2, encoder_layers=2, decoder_attention_heads=4, encoder_attention_heads=4,
             decoder_ffn_dim=64, encoder_ffn_dim=64, d_model=32)
_MLA = dict(num_key_value_heads=4, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
            v_head_dim=8, qk_head_dim=12)
_MIXED = dict(mlp_layer_types=["dense", "sparse"])  # a dense layer, then experts
OVERRIDES: dict[str, dict] = {
    "bart": _BART, "bigbird_pegasus": _BART, "blenderbot": _BART, "blenderbot-small": _BART, "marian": _BART,
    "mbart": _BART, "mvp": _BART, "pegasus": _BART, "plbart": _BART, "whisper": _BART,
    "trocr": dict(_BART, d_model=32),
    "bloom": dict(n_inner=64), "falcon": dict(ffn_hidden_size=64), "gpt2": dict(n_inner=64),
    "gpt-sw3": dict(n_inner=64), "gpt_bigcode": dict(n_inner=64), "openai-gpt": dict(n_inner=64),
    "codegen": dict(rotary_dim=4, n_inner=64), "gptj": dict(rotary_dim=4, n_inner=64),
    "gpt_neo": dict(attention_types=[[["global", "local"], 1]]),
    "gpt_neox_japanese": dict(intermediate_multiple_size=2),
    "helium": dict(head_dim=8), "hunyuan_v1_dense": dict(head_dim=8), "hunyuan_v1_moe": dict(head_dim=8),
    "ministral": dict(head_dim=8),
    "minicpm3": _MLA, "youtu": _MLA, "deepseek_v2": _MLA, "deepseek_v3": _MLA,
    "dots3_note_text": dict(num_key_value_heads=4), "dots3_note": dict(num_key_value_heads=4),
    "moshi": dict(ffn_dim=64), "mpt": dict(expansion_ratio=2), "opt": dict(ffn_dim=64, word_embed_proj_dim=32),
    "xglm": dict(ffn_dim=64), "biogpt": dict(),
    "qwen3_5_text": dict(layer_types=["linear_attention", "full_attention"]),
    "lfm2": dict(block_ff_dim=64, block_auto_adjust_ff_dim=False),
    "mamba2": dict(num_heads=8, head_dim=8), "bamba": dict(mamba_n_heads=8, mamba_d_head=8, attn_layer_indices=[1]),
    "gemma4_text": dict(vocab_size_per_layer_input=400, hidden_size_per_layer_input=8),
    "granitemoehybrid": dict(mamba_n_heads=8, mamba_d_head=8, layer_types=["mamba", "attention"]),
    # (its default SSM widths made transformers 5.16's chunked scan ask for 34 GB on the tiny config)
    "falcon_h1": dict(mamba_d_ssm=64, mamba_n_heads=8, mamba_d_head=8, mamba_d_state=16, mamba_chunk_size=16),
    "gemma4_assistant": dict(hidden_size_per_layer_input=0),
    "beam": _MIXED, **dict.fromkeys(("axk1", "axk2", "sarvam_mla", "glm4_moe_lite"), _MLA),
    # (index_topk at least the checks' lengths: the sparse indexer keeps every key; with 4, transformers 5.16's
    # cached indexer kept other keys than a full pass, which the matrix saw as streamed != teacher-forced)
    **dict.fromkeys(("deepseek_v32", "glm_moe_dsa", "hy_v4", "dots3_note_text"),
                    dict(_MLA, **_MIXED, index_head_dim=8, index_topk=64, head_dim=8, sliding_window=16,
                         shared_experts_intermediate_size=16)),
    **dict.fromkeys(("bailing_hybrid", "kimi_linear"),
                    dict(_MLA, **_MIXED, layer_types=["linear_attention", "full_attention"], linear_head_dim=8)),
    "jamba": dict(attn_layer_period=2, attn_layer_offset=1),
    "flint": dict(mlp_only_layers=[0], initializer_range=0.4),
    "nemotron_h": dict(layers_block_type=["moe", "full_attention"]),
    "qwen3_5_moe_text": dict(layer_types=["linear_attention", "full_attention"]),
    "qwen3_next": dict(layer_types=["linear_attention", "full_attention"]),
    "qwen4_exp_text": dict(layer_types=["linear_attention", "indexed_attention"], head_dim=8, linear_key_head_dim=8,
                           linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4, hc_lowrank=8,
                           ple_embed_dim=32, ngram_vocab_size_base=64, split_ngram_parts=4, indexer_n_heads=2,
                           indexer_kv_heads=1, indexer_head_dim=8, indexer_budget=8, indexer_compress_ratio=2),
    "deepseek_v4": dict(layer_types=["heavily_compressed_attention", "compressed_sparse_attention"],
                        mlp_layer_types=["moe", "moe"], index_topk=4, head_dim=8, q_lora_rank=16, o_lora_rank=16,
                        index_n_heads=2, index_head_dim=8, qk_rope_head_dim=4, sliding_window=16),
    "inkling_text": dict(layer_types=["hybrid_sliding", "hybrid"], mlp_layer_types=["sparse", "sparse"]),
    "inkling2_text": dict(layer_types=["hybrid_sliding", "hybrid"], unpadded_vocab_size=400),
    "inkling2_loop_text": dict(layer_types=["hybrid_sliding", "hybrid"], unpadded_vocab_size=400),
    "zaya": dict(layer_types=["hybrid", "hybrid"], router_hidden_size=16, num_experts_per_tok=1,
                 initializer_range=0.4),  # (at 0.1 its experts move no greedy token, so no action could show)
    "solar_open": dict(initializer_range=0.4),
    "prophetnet": dict(num_encoder_layers=2, num_decoder_layers=2, num_hidden_layers=None),
    "xlnet": dict(max_position_embeddings=None), "reformer": dict(is_decoder=True),
}


# Mixture-of-experts configs: few, narrow experts (names as each family spells them); applied where the
# type's own config routes over experts.
_MOE = dict(num_local_experts=4, num_experts=4, n_routed_experts=4, moe_num_experts=4, num_experts_per_tok=2,
            moe_topk=2, moe_intermediate_size=16, expert_intermediate_size=16, moe_ffn_hidden_size=16,
            first_k_dense_replace=1, n_group=1, topk_group=1)  # (DeepSeek-style: a dense first layer, then experts)
_MOE_COUNTS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


@dataclass(frozen=True)
class Row:
    model_type: str
    where: str  # module path of a layer's down projection ("N" for the layer index), or "" where refused
    refusal: str | None  # None: passes (the matrix test proves it); else why it is refused or not built


def tiny_config(model_type: str, vocab_size: int = 400):
    """A tiny config of `model_type` (2 layers, hidden 32 where the architecture allows)."""
    def build(moe: dict):
        kw = {**_COMMON, "vocab_size": vocab_size, **moe, **OVERRIDES.get(model_type, {})}
        return AutoConfig.for_model(model_type, **{k: v for k, v in kw.items() if v is not None})

    config = build({})
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if any(isinstance(getattr(text, key, None), int) and getattr(text, key) > 1 for key in _MOE_COUNTS):
        config = build({key: value for key, value in _MOE.items() if hasattr(text, key)})
    return config


def _meta_model(model_type: str):
    """The model's structure on the meta device (no weights): the tiny config's, or where that cannot be
    built, the default config's (refusals are structural, so a full-size skeleton answers them too)."""
    try:
        config = tiny_config(model_type)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config), True
    except Exception:
        config = AutoConfig.for_model(model_type)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config), False


def row(model_type: str) -> Row:
    if model_type in NOT_BUILT:
        return Row(model_type, "", f"not built: {NOT_BUILT[model_type]}")
    try:
        model, tiny = _meta_model(model_type)
    except Exception as error:  # neither config builds in this release: nothing to resolve
        message = str(error).strip().splitlines()[-1].strip() if str(error).strip() else ""
        return Row(model_type, "", f"not built: neither a tiny nor its default config builds in transformers "
                                   f"{transformers.__version__} ({type(error).__name__}: {message[:90]})")
    try:
        sites = resolve(model)
    except UnsupportedModelError as error:
        return Row(model_type, "", f"refused: {refusal_reason(error)}")
    if not tiny:
        raise RuntimeError(f"{model_type}: resolves but has no tiny config; add it to hguard.conformance.OVERRIDES")
    return Row(model_type, where(sites), None)


def where(sites) -> str:
    """The module path of a layer's neurons, "N" for the layer index (and which layers, where not all)."""
    path = f"{sites.layers_path}.N.{sites.down_name}"
    return f"{path} (N in {list(sites.layer_ids)})" if sites.layer_ids else path


def refusal_reason(error: UnsupportedModelError) -> str:
    """The reason an UnsupportedModelError gives, without the model type it names first (a composite type's
    may be its text model's)."""
    text = re.sub(r"^model_type '[^']*':? ", "", str(error))
    text = text.removeprefix("is ").split("; ")[0]
    return text.split(" (looked for")[0]


def markdown(rows: list[Row] | None = None) -> str:
    rows = [row(t) for t in TYPES] if rows is None else rows
    passes = sum(r.refusal is None for r in rows)
    lines = [
        f"transformers {transformers.__version__}: {passes} of {len(rows)} causal-LM types pass; the rest are "
        "refused by name or not built.",
        "",
        "| model_type | neurons (down projection) | status |",
        "|---|---|---|",
    ]
    for r in rows:
        where = f"`{r.where}`" if r.where else ""
        lines.append(f"| {r.model_type} | {where} | {'passes' if r.refusal is None else r.refusal} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true", help="print the README's supported-models table")
    args = parser.parse_args(argv)
    if args.markdown:
        print(markdown())
    else:
        for r in (row(t) for t in TYPES):
            print(f"{r.model_type:28s} {r.where or '-':40s} {'passes' if r.refusal is None else r.refusal}")


if __name__ == "__main__":
    main()
