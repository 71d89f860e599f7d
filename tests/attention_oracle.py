"""Attention written out in plain PyTorch, plugged into a model through transformers' public
attention interface: the oracle for the sites inside attention and the sweeps over them.

``patch(layer, name, value)`` may replace ``q``, ``k``, ``v``, ``pattern`` or ``z`` of any
layer; every layer's values are recorded.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask


def attention_by_hand(seen: dict, patch=None):
    def attend(module, q, k, v, mask, scaling=None, **kwargs):
        layer = module.layer_idx
        edit = (lambda name, x: patch(layer, name, x)) if patch else (lambda name, x: x)
        q, k, v = edit("q", q), edit("k", k), edit("v", v)
        repeat = q.shape[1] // k.shape[1]  # GQA: kv head h serves query heads h*repeat..
        keys, values = k.repeat_interleave(repeat, 1), v.repeat_interleave(repeat, 1)
        scale = scaling if scaling is not None else q.shape[-1] ** -0.5
        scores = q @ keys.transpose(-1, -2) * scale + (0 if mask is None else mask)
        pattern = edit("pattern", scores.softmax(-1))
        z = edit("z", (pattern @ values).transpose(1, 2))
        seen[layer] = dict(q=q, k=k, v=v, pattern=pattern, z=z)
        return z, pattern

    return attend


@torch.no_grad()
def logits_by_hand(model, texts: list[str], patch=None) -> tuple[torch.Tensor, dict]:
    """The logits of ``texts`` (left-padded) with attention by hand, and every layer's values."""
    seen: dict = {}
    AttentionInterface.register("by_hand", attention_by_hand(seen, patch))
    AttentionMaskInterface.register("by_hand", eager_mask)
    before = model.module.config._attn_implementation
    model.module.set_attn_implementation("by_hand")
    try:
        enc = model.tokenizer(texts, return_tensors="pt", padding=True, padding_side="left")
        logits = model.module(**enc).logits
    finally:
        model.module.set_attn_implementation(before)
    return logits, seen
