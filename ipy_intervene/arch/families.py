"""The family table: for each ``model_type``, where its sites live and what the model does
around its blocks, stated from transformers' modeling files (5.x) and proven on each model's
first analysis by the self-check (:mod:`ipy_intervene.arch.check`).

>>> "gemma2" in FAMILIES and FAMILIES["gemma2"]["post_attn_norm"]
'post_attention_layernorm'
"""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from ipy_intervene.arch.adapter import Adapter, finite, get_path

_LLAMA_LIKE = dict(blocks="model.layers", final_norm="model.norm", unembed="lm_head",
                   embed="model.embed_tokens", attn="self_attn", mlp="mlp",
                   mid_norm="post_attention_layernorm", head_proj="self_attn.o_proj",
                   attn_norm="input_layernorm", mlp_norm="post_attention_layernorm",
                   qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                   qkv_layout="separate")
# Gemma 2/3: a norm after attention and after the MLP (what the block adds is their output),
# a pre-MLP norm that reads resid_mid; the embedding module scales by sqrt(hidden) itself.
_GEMMA2 = {**_LLAMA_LIKE, "mid_norm": "pre_feedforward_layernorm",
           "mlp_norm": "pre_feedforward_layernorm", "post_attn_norm": "post_attention_layernorm",
           "post_mlp_norm": "post_feedforward_layernorm"}
# OLMo 2/3: post-norms only; attention reads the residual stream itself, the MLP reads
# resid_mid itself (so resid_mid is the MLP's input)
_OLMO2 = {**_LLAMA_LIKE, "mid_norm": "mlp", "attn_norm": None, "mlp_norm": None,
          "post_attn_norm": "post_attention_layernorm",
          "post_mlp_norm": "post_feedforward_layernorm"}
# Cohere (1, 2): one norm, attention and MLP in parallel on its output
_COHERE = {**_LLAMA_LIKE, "mid_norm": None, "mlp_norm": "input_layernorm"}
_FALCON_INPLACE = ("Falcon adds attention's output into the MLP's output tensor in place "
                   "(`mlp_output += attention_output`), so that tensor holds attn_out + mlp_out "
                   "once the block ends: a read after the block, or a written value, would be "
                   "wrong. Read resid_pre, attn_out and resid_post (mlp_out = resid_post - "
                   "resid_pre - attn_out)")

# Every family here has, unless its entry says otherwise, blocks whose attention and MLP
# outputs are added to the residual stream as they are, embeddings that reach block 0 as
# `embed` outputs them, and logits that are the unembedding of the final norm. MoE families
# (mixtral, qwen2_moe, qwen3_moe, olmoe, gpt_oss, deepseek_v3): `mlp` is the sparse block (its
# output, shared experts included, is mlp_out). The q/k/v layouts (see Adapter) are those of
# transformers' modeling files: GPT-2's Conv1D c_attn is q|k|v, NeoX views query_key_value as
# [.., heads, 3 * head_size] (per head), Phi-3 slices qkv_proj at H*d and H*d + KV*d.
# DeepSeek V3's multi-head latent attention has no per-head q/k/v projection (qkv=None: edge
# attribution refuses it); its o_proj still reads one z per head.
FAMILIES: dict[str, dict[str, Any]] = {
    "gpt2": dict(blocks="transformer.h", final_norm="transformer.ln_f", unembed="lm_head",
                 embed="transformer.wte", attn="attn", mlp="mlp", mid_norm="ln_2",
                 head_proj="attn.c_proj", attn_norm="ln_1", mlp_norm="ln_2",
                 qkv=("attn.c_attn",), qkv_layout="blocks"),
    "gpt_neox": dict(blocks="gpt_neox.layers", final_norm="gpt_neox.final_layer_norm",
                     unembed="lm_head", embed="gpt_neox.embed_in", attn="attention", mlp="mlp",
                     mid_norm="post_attention_layernorm", head_proj="attention.dense",
                     attn_norm="input_layernorm", mlp_norm="post_attention_layernorm",
                     qkv=("attention.query_key_value",), qkv_layout="per_head"),
    **{name: _LLAMA_LIKE for name in ("llama", "mistral", "qwen2", "qwen3")},
    "gptj": dict(blocks="transformer.h", final_norm="transformer.ln_f", unembed="lm_head",
                 embed="transformer.wte", attn="attn", mlp="mlp", mid_norm=None,
                 head_proj="attn.out_proj", attn_norm="ln_1", mlp_norm="ln_1",
                 qkv=("attn.q_proj", "attn.k_proj", "attn.v_proj"), qkv_layout="separate"),
    **{name: _LLAMA_LIKE for name in ("mixtral", "olmo", "stablelm", "qwen2_moe",
                                      "qwen3_moe", "smollm3", "gemma", "olmoe", "gpt_oss")},
    "phi3": {**_LLAMA_LIKE, "qkv": ("self_attn.qkv_proj",), "qkv_layout": "blocks"},
    "gemma2": _GEMMA2,
    "gemma3_text": _GEMMA2,
    "olmo2": _OLMO2,
    "olmo3": _OLMO2,
    "granite": _LLAMA_LIKE,
    "cohere": _COHERE,
    "cohere2": _COHERE,
    "phi": {**_LLAMA_LIKE, "final_norm": "model.final_layernorm", "mid_norm": None,
            "mlp_norm": "input_layernorm", "head_proj": "self_attn.dense"},
    "gpt_neo": dict(blocks="transformer.h", final_norm="transformer.ln_f", unembed="lm_head",
                    embed="transformer.wte", attn="attn", mlp="mlp", mid_norm="ln_2",
                    head_proj="attn.attention.out_proj", attn_norm="ln_1", mlp_norm="ln_2",
                    qkv=tuple(f"attn.attention.{p}_proj" for p in "qkv"),
                    qkv_layout="separate"),
    "falcon": dict(blocks="transformer.h", final_norm="transformer.ln_f", unembed="lm_head",
                   embed="transformer.word_embeddings", attn="self_attention", mlp="mlp",
                   mid_norm="post_attention_layernorm", head_proj="self_attention.dense",
                   attn_norm="input_layernorm", mlp_norm="post_attention_layernorm",
                   qkv=("self_attention.query_key_value",), qkv_layout="per_head"),
    "deepseek_v3": {**_LLAMA_LIKE, "qkv": None, "qkv_layout": None},
}
# Gemma 4 (text): Gemma 2's block plus a late writer and a block scale (see _gemma4). Its
# sites pass the check; methods that read the stream as the sum of its parts (decompose,
# edge attribution, attribution graphs) refuse it (Adapter.unsummed).
GEMMA4: dict[str, Any] = {**_GEMMA2, "block_scale": "layer_scalar"}
FAMILIES["gemma4_text"] = GEMMA4
_PARALLEL = {"gpt_neox": "use_parallel_residual", "stablelm": "use_parallel_residual"}
# With the parallel residual, the norm the MLP reads (StableLM: the attention's own; NeoX
# keeps post_attention_layernorm, applied to the block's input).
_PARALLEL_MLP_NORM = {"stablelm": "input_layernorm"}


def _falcon(config: Any, fields: dict[str, Any]) -> dict[str, Any]:
    """Falcon's three block shapes (``FalconDecoderLayer``): serial (parallel_attn=False),
    parallel on one norm, and the new architecture's parallel blocks on ``ln_attn`` /
    ``ln_mlp``; its fused q/k/v split by multi_query / new_decoder_architecture."""
    new = bool(getattr(config, "new_decoder_architecture", False))
    parallel = new or bool(getattr(config, "parallel_attn", True))
    if parallel:
        two = new and (getattr(config, "num_ln_in_parallel_attn", None) or 2) == 2
        norm = "ln_attn" if two else "input_layernorm"
        fields.update(mid_norm=None, attn_norm=norm, mlp_norm="ln_mlp" if two else norm,
                      refused=(("mlp_out", _FALCON_INPLACE),))
    if new:       # [kv group: its queries, its key, its value]: no layout of ours
        fields.update(qkv=None, qkv_layout=None)
    elif getattr(config, "multi_query", False):
        fields["qkv_layout"] = "blocks"
    return fields


def _granite(config: Any, fields: dict[str, Any]) -> dict[str, Any]:
    fields.update(embed_scale=finite(getattr(config, "embedding_multiplier", 1.0)),
                  residual_multiplier=finite(getattr(config, "residual_multiplier", 1.0)),
                  logit_scale=1.0 / finite(getattr(config, "logits_scaling", 1.0)))
    return fields


def _cohere(config: Any, fields: dict[str, Any]) -> dict[str, Any]:
    fields["logit_scale"] = finite(getattr(config, "logit_scale", 1.0))
    return fields


def _softcap(config: Any, fields: dict[str, Any]) -> dict[str, Any]:
    cap = getattr(config, "final_logit_softcapping", None)
    fields["logit_softcap"] = None if cap is None else float(cap)
    return fields


def _gemma4(config: Any, fields: dict[str, Any]) -> dict[str, Any]:
    """Gemma 4 (``Gemma4TextDecoderLayer``): Gemma 2's block, then, with per-layer inputs
    (``hidden_size_per_layer_input``), a third writer after the MLP's add (a gated projection
    of the layer's per-layer embedding, normed by ``post_per_layer_input_norm``), then the
    whole stream times the buffer ``layer_scalar``. With ``enable_moe_block`` the dense MLP
    and the experts are summed before ``post_feedforward_layernorm``, whose output stays
    mlp_out."""
    if getattr(config, "hidden_size_per_layer_input", 0):
        fields["late_writer"] = "post_per_layer_input_norm"
    return _softcap(config, fields)


_FROM_CONFIG: dict[str, Callable[[Any, dict[str, Any]], dict[str, Any]]] = {
    "falcon": _falcon, "granite": _granite, "cohere": _cohere, "cohere2": _cohere,
    "gemma2": _softcap, "gemma3_text": _softcap, "gemma4_text": _gemma4,
}


def family_adapter(module: nn.Module) -> Adapter | None:
    """The table's map of ``module`` (its config's ``model_type``), unchecked; None for a
    family the table lacks."""
    config = getattr(module, "config", None)
    model_type = getattr(config, "model_type", None)
    family = FAMILIES.get(model_type)
    if family is None:
        return None
    fields = dict(family)
    flag = _PARALLEL.get(model_type)
    if flag is not None and getattr(config, flag, False):
        fields["mid_norm"] = None
        fields["mlp_norm"] = _PARALLEL_MLP_NORM.get(model_type, fields["mlp_norm"])
    if model_type in _FROM_CONFIG:
        fields = _FROM_CONFIG[model_type](config, fields)
    return Adapter(model_type, n_heads=n_heads(config), **fields).with_layers(module)


def changed_in_place(module: nn.Module) -> list[nn.Module]:
    """The modules whose output tensor ``module``'s forward changes in place after their
    hooks ran (parallel Falcon: each block's MLP, into whose output attention's is added),
    so that a read of one must be a copy; [] for every other family."""
    adapter = family_adapter(module)
    if adapter is None or dict(adapter.refused).get("mlp_out") is not _FALCON_INPLACE:
        return []
    return [get_path(adapter.block(module, layer), adapter.mlp)
            for layer in range(adapter.n_layers)]


def n_heads(config: Any) -> int:
    """The attention head count a config states (``num_attention_heads``, ``n_head``, ...)."""
    for name in ("num_attention_heads", "n_head", "num_heads", "n_heads"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    raise AttributeError(f"{type(config).__name__} states no attention head count")
