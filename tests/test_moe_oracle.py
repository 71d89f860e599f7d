"""The plain-hooks oracle of the MoE tests (one prompt at a time, no padding), the tiny MoE
models of each family, and the checks that the oracle itself is right: each expert's
feed-forward written by hand from the fused weights, summed over the chosen experts with
the router's weights (+ the shared expert), is the MoE block's output."""

from __future__ import annotations

from contextlib import ExitStack

import pytest
import torch

import ipy_intervene as ii
from ipy_intervene.arch import moe
from tests.conftest import tiny_family

BASE = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=64, max_position_embeddings=64, bos_token_id=0, eos_token_id=0,
            pad_token_id=1)
CONFIGS = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=32, mlp_only_layers=[0]),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      norm_topk_prob=True),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2),
    "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2, head_dim=8),
    "deepseek_v3": dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                        first_k_dense_replace=1, n_group=2, topk_group=1, kv_lora_rank=16,
                        q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
                        num_key_value_heads=4, n_shared_experts=1),
}
FAMILIES = tuple(CONFIGS)
PAIRS = [("When Mary and John went to the store , John gave a drink to",
          "When Mary and John went to the store , Mary gave a drink to"),
         ("Then , Mary and John had", "Then , John and Mary had"),
         ("After Mary and John went , John gave it to", "After Mary and John went , Mary gave it to")]
CLEAN = [c for c, _ in PAIRS]            # 15, 7 and 11 tokens: the batch is left-padded
CORRUPT = [c for _, c in PAIRS]
_models: dict[str, ii.Model] = {}


def moe_model(family: str, demo: ii.Model) -> ii.Model:
    """A seeded tiny model of ``family`` (its routers' weights drawn at random: some
    families start them at zero, which would make every choice a tie)."""
    if family not in _models:
        module = tiny_family(family, len(demo.tokenizer), **{**BASE, **CONFIGS[family]})
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for index in moe.moe_layers(module):
                weight = moe.moe_layer(module, index).router.weight
                weight.copy_(torch.randn(weight.shape, generator=gen))
        _models[family] = ii.wrap(module, demo.tokenizer)
    return _models[family]


@pytest.fixture(params=FAMILIES)
def family_model(request, demo) -> tuple[str, ii.Model]:
    return request.param, moe_model(request.param, demo)


def ffn(layer: moe.MoeLayer, x: torch.Tensor, e: int) -> torch.Tensor:
    """Expert ``e``'s feed-forward on ``x [n, d]``, written from the fused weights."""
    ex = layer.experts
    if layer.family == "gpt_oss":           # interleaved gate/up, clamped, biases
        gu = x @ ex.gate_up_proj[e] + ex.gate_up_proj_bias[e]
        gate, up = gu[..., ::2].clamp(max=ex.limit), gu[..., 1::2].clamp(-ex.limit, ex.limit)
        return ((up + 1) * gate * torch.sigmoid(gate * ex.alpha)) @ ex.down_proj[e] + \
            ex.down_proj_bias[e]
    gate, up = (x @ ex.gate_up_proj[e].T).chunk(2, -1)
    return (ex.act_fn(gate) * up) @ ex.down_proj[e].T


def hand_terms(layer: moe.MoeLayer, seen: dict) -> torch.Tensor:
    """Every expert's contribution ``[pos, n_experts, d]`` from what one prompt's experts got."""
    x, index, weights = seen["x"], seen["index"], seen["weights"]
    out = torch.zeros(x.shape[0], layer.n_experts, x.shape[1])
    for e in range(layer.n_experts):
        w = (weights * (index == e)).sum(-1, keepdim=True).to(x.dtype)
        out[:, e] = w * ffn(layer, x, e)
    return out


def shared_out(layer: moe.MoeLayer, x: torch.Tensor) -> torch.Tensor:
    """The shared expert's share of the block's output (zero where the family has none)."""
    if layer.family == "qwen2_moe":
        expert, gate = layer.shared
        return torch.sigmoid(gate(x)) * expert(x)
    if layer.family == "deepseek_v3":
        return layer.shared[0](x)
    return torch.zeros_like(x)


def run_alone(model: ii.Model, text: str, layers: list[int], edit=None) -> tuple[dict, torch.Tensor]:
    """One prompt, plain hooks: per layer what the router, the experts and the block saw
    (``logits``, ``x``, ``index``, ``weights``, ``out``, ``block_in``); ``edit(layer, seen,
    out)`` may return a new experts output. Returns (seen per layer, logits)."""
    seen: dict[int, dict] = {l: {} for l in layers}
    ids = model.tokenizer(text, return_tensors="pt").input_ids
    with ExitStack() as stack, torch.no_grad():
        for l in layers:
            layer = moe.moe_layer(model.module, l)
            hooks = [
                layer.router.register_forward_hook(
                    lambda m, a, o, s=seen[l]: s.__setitem__("logits", o[0].clone())),
                layer.experts.register_forward_pre_hook(lambda m, a, s=seen[l]: s.update(
                    x=a[0].clone(), index=a[1].clone(), weights=a[2].clone())),
                layer.experts.register_forward_hook(
                    lambda m, a, o, l=l: None if edit is None else edit(l, seen[l], o)),
                layer.block.register_forward_pre_hook(
                    lambda m, a, s=seen[l]: s.__setitem__("block_in", a[0][0].clone())),
                layer.block.register_forward_hook(lambda m, a, o, s=seen[l]: s.__setitem__(
                    "out", (o[0] if isinstance(o, tuple) else o)[0].clone())),
            ]
            for h in hooks:
                stack.callback(h.remove)
        logits = model.module(ids).logits[0]
    return seen, logits


@torch.no_grad()
def test_the_hand_written_experts_recompose_the_block(family_model):
    """The oracle's own check: hand-written experts, weighted and summed, + shared expert
    == the MoE block's output, one prompt alone (so the other tests' oracle is right)."""
    family, model = family_model
    layers = moe.moe_layers(model.module)
    seen, _ = run_alone(model, CLEAN[0], layers)
    for l in layers:
        layer = moe.moe_layer(model.module, l)
        terms = hand_terms(layer, seen[l])
        total = terms.sum(1) + shared_out(layer, seen[l]["block_in"])
        torch.testing.assert_close(total, seen[l]["out"], rtol=1e-5, atol=1e-5)
        assert terms.abs().sum() > 0 and (terms.abs().sum(-1) > 0).sum() == 2 * terms.shape[0]
