"""Mixture of experts (ipy_intervene.arch.moe, ii.routing, ii.ablate_experts) on Mixtral,
Qwen2-MoE, Qwen3-MoE, OLMoE, GPT-OSS and DeepSeek-V3: a left-padded batch of three prompts
of different lengths against the plain-hooks oracle run one prompt at a time
(tests/test_moe_oracle.py), and the errors."""

from __future__ import annotations

import pytest
import torch

import ipy_intervene as ii
from ipy_intervene.arch import moe
from ipy_intervene.errors import SiteError
from tests.conftest import hook_count
from tests.test_moe_oracle import (CLEAN, CONFIGS, BASE, family_model, ffn, hand_terms,  # noqa: F401
                                   moe_model, run_alone, shared_out)

TOL = dict(rtol=1e-5, atol=1e-5)


def by_index(index: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(index, values) with each token's k entries sorted by expert (top-k order aside)."""
    order = index.argsort(-1)
    return index.gather(-1, order), values.gather(-1, order)


@torch.no_grad()
def test_routing_reads_equal_each_prompt_alone(family_model):
    family, model = family_model
    layers = moe.moe_layers(model.module)
    r = ii.routing(model, CLEAN, experts=None)
    assert r.layers == layers and r.mask.shape[0] == 3
    for i, text in enumerate(CLEAN):
        seen, _ = run_alone(model, text, layers)
        got = r.prompt(i)
        for l in layers:
            layer = moe.moe_layer(model.module, l)
            assert got["logits"][l].shape == (len(seen[l]["x"]), layer.n_experts)
            torch.testing.assert_close(got["logits"][l], seen[l]["logits"].to(torch.float32)
                                       .to(got["logits"][l].dtype), **TOL)
            index, weights = by_index(got["chosen"][l], got["weights"][l])
            want_index, want_weights = by_index(seen[l]["index"], seen[l]["weights"])
            assert torch.equal(index, want_index), (family, l, i)
            torch.testing.assert_close(weights, want_weights, **TOL)
            terms = hand_terms(layer, seen[l])
            torch.testing.assert_close(got["terms"][l], terms, **TOL)
            # the chosen experts' contributions (+ the shared expert) are mlp_out
            total = got["terms"][l].sum(1) + shared_out(layer, seen[l]["block_in"])
            torch.testing.assert_close(total, seen[l]["out"], **TOL)
    assert hook_count(model.module) == 0


@torch.no_grad()
def test_routing_counts_real_tokens_only(demo):
    model = moe_model("mixtral", demo)
    r = ii.routing(model, CLEAN, layers=[1])
    assert int(r.counts(1).sum()) == 2 * sum(len(model.tokenizer(t).input_ids) for t in CLEAN)
    assert r.terms == {} and r.experts == []


@pytest.mark.parametrize("positions", [None, -1])
@torch.no_grad()
def test_ablated_expert_equals_the_forward_without_its_term(family_model, positions):
    """Removing an expert (not renormalising the others) == a hand-written forward that
    subtracts that expert's weighted feed-forward from the experts' output."""
    family, model = family_model
    l = moe.moe_layers(model.module)[0]
    layer = moe.moe_layer(model.module, l)
    batch = model.prepare([CLEAN])
    plain = model.module(**batch.kwargs).logits
    e = int(ii.routing(model, CLEAN, layers=[l]).chosen[l][0, -1, 0])   # used at the end
    with ii.ablate_experts(model, {l: [e]}, positions=positions):
        logits = model.module(**batch.kwargs).logits
    assert hook_count(model.module) == 0

    def remove(at, seen, out):
        w = (seen["weights"] * (seen["index"] == e)).sum(-1, keepdim=True).to(out.dtype)
        term = w * ffn(layer, seen["x"], e)
        if positions is not None:
            term[:-1] = 0
        return out - term

    for i, text in enumerate(CLEAN):
        _, want = run_alone(model, text, [l], edit=remove)
        got = logits[i, -len(want):]
        torch.testing.assert_close(got, want, **TOL)
    assert not torch.allclose(logits[0, -1], plain[0, -1], atol=1e-4)   # it did something


@torch.no_grad()
def test_moe_layer_facts(demo):
    layer = moe.moe_layer(moe_model("qwen2_moe", demo).module, -1)
    assert (layer.layer, layer.path, layer.n_experts, layer.top_k) == (
        2, "model.layers[2].mlp", 4, 2)
    assert [type(m).__name__ for m in layer.shared] == ["Qwen2MoeMLP", "Linear"]
    assert "renormalised if config.norm_topk_prob" in layer.routing
    assert moe.moe_layer(moe_model("mixtral", demo).module, 0).shared == ()


# -- errors --------------------------------------------------------------------------------

def test_an_expert_out_of_range_is_an_error(demo):
    model = moe_model("mixtral", demo)
    with pytest.raises(SiteError, match=r"expert 9 is out of range: mixtral layer 1 "
                                        r"\(model.layers\[1\].mlp.experts\) has 4 experts"):
        ii.routing(model, CLEAN, layers=[1], experts=[9])
    with pytest.raises(SiteError, match="expert 4 is out of range"):
        with ii.ablate_experts(model, {1: 4}):
            pass
    with pytest.raises(SiteError, match="expert -5 is out of range"):
        ii.expert_sweep(model, CLEAN, None, lambda x: x[:, -1, 0], method="ablation",
                        experts=[-5])
    with pytest.raises(SiteError, match=r"has 4 experts \(0..3"):
        moe.expert_point(moe.moe_layer(model.module, 0).experts, 4)
    assert moe.moe_layer(model.module, 0).check_expert(-1) == 3
    assert hook_count(model.module) == 0


def test_a_model_without_experts_is_an_error(demo):
    for call in (lambda: ii.routing(demo, CLEAN), lambda: moe.moe_layer(demo.module, 0),
                 lambda: ii.expert_sweep(demo, CLEAN, CLEAN, lambda x: x[:, -1, 0])):
        with pytest.raises(SiteError, match="'gpt2' is not a mixture-of-experts family .*"
                                            "mixtral.*its MLP is dense: use the site mlp_out"):
            call()
    assert moe.point(demo.module.transformer.h[0].mlp, "router_logits") is None
    assert moe.expert_point(demo.module.transformer.h[0].mlp, 0) is None


@pytest.mark.parametrize("family, field", [("deepseek_v3", "first_k_dense_replace"),
                                           ("qwen2_moe", "mlp_only_layers")])
def test_a_dense_layer_of_a_mixed_model_is_an_error(demo, family, field):
    model = moe_model(family, demo)
    assert moe.moe_layers(model.module) == [1, 2]
    with pytest.raises(SiteError, match=f"{family} layer 0 is dense .*config.{field}.*"
                                        r"mlp_out. MoE layers of this model: \[1, 2\]"):
        ii.routing(model, CLEAN, layers=[0])
    with pytest.raises(SiteError, match="layer 0 is dense"):
        ii.expert_sweep(model, CLEAN, None, lambda x: x[:, -1, 0], method="ablation",
                        layers=[0, 1])
    with pytest.raises(SiteError, match="layer 3 is out of range: this .* has 3 layers"):
        moe.moe_layer(model.module, 3)
    r = ii.routing(model, CLEAN)                     # default: the MoE layers only
    assert r.layers == [1, 2]


def test_an_moe_family_not_in_the_table_is_named_as_such(demo):
    from tests.conftest import tiny_family

    module = tiny_family("phimoe", len(demo.tokenizer), hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, intermediate_size=32,
                         num_local_experts=4)
    with pytest.raises(SiteError, match="'phimoe' has fused experts, but ipy_intervene does "
                                        "not know where its router and experts are"):
        ii.routing(ii.wrap(module, demo.tokenizer), CLEAN)
