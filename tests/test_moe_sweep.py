"""ii.expert_sweep against a per-prompt loop of plain hooks: each (layer, expert[, position])
cell, one prompt at a time, with each expert's feed-forward written by hand from the fused
weights (tests/test_moe_oracle.py): patching puts the source prompt's contribution in place
of the base prompt's, ablating removes it (the other weights not renormalised)."""

from __future__ import annotations

import re

import pytest
import torch

import ipy_intervene as ii
from ipy_intervene.arch import moe
from ipy_intervene.errors import InputError
from tests.conftest import hook_count
from tests.test_moe_oracle import CLEAN, CORRUPT, FAMILIES, ffn, moe_model, run_alone

TOL = dict(rtol=1e-5, atol=1e-5)


def projection(model: ii.Model) -> tuple[torch.Tensor, object]:
    """A metric that sees every logit of the last position: a fixed random projection."""
    r = torch.randn(len(model.tokenizer), generator=torch.Generator().manual_seed(3))
    return r, lambda logits: logits[:, -1] @ r


def term(layer: moe.MoeLayer, seen: dict, e: int) -> torch.Tensor:
    w = (seen["weights"] * (seen["index"] == e)).sum(-1, keepdim=True).to(seen["x"].dtype)
    return w * ffn(layer, seen["x"], e)


def oracle(model: ii.Model, base: str, source: str | None, l: int, e: int,
           local: int | None, r: torch.Tensor) -> float:
    """One prompt: the base run with expert ``e``'s contribution at layer ``l`` (at the
    prompt's position ``local``, or all) replaced by the source's (removed: source None)."""
    layer = moe.moe_layer(model.module, l)
    given = None
    if source is not None:
        seen, _ = run_alone(model, source, [l])
        given = term(layer, seen[l], e)

    def edit(at, seen, out):
        new = -term(layer, seen, e) + (0 if given is None else given)
        if local is not None:
            keep = torch.zeros_like(new)
            keep[local] = new[local]
            new = keep
        return out + new

    _, logits = run_alone(model, base, [l], edit=edit)
    return float(logits[-1] @ r)


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_expert_sweep_equals_a_per_prompt_loop(demo, family):
    model = moe_model(family, demo)
    r, metric = projection(model)
    result = ii.expert_sweep(model, CLEAN, CORRUPT, metric, batch_size=5)
    layers = moe.moe_layers(model.module)
    n = moe.moe_layer(model.module, layers[0]).n_experts
    assert result.dims == ("layer", "expert") and result.values.shape == (len(layers), n)
    assert result.layers == layers and result.experts == list(range(n))
    for li, l in enumerate(layers):
        for e in range(n):
            want = [oracle(model, c, s, l, e, None, r) for s, c in zip(CLEAN, CORRUPT)]
            torch.testing.assert_close(result.per_prompt[li, e], torch.tensor(want), **TOL)
    clean = [float(run_alone(model, t, [])[1][-1] @ r) for t in CLEAN]
    assert result.clean == pytest.approx(sum(clean) / 3, rel=1e-5, abs=1e-5)
    assert result.extra["renormalised"] is False
    assert hook_count(model.module) == 0


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss", "deepseek_v3"])
@torch.no_grad()
def test_per_position_noising_and_ablation_equal_the_loop(demo, family):
    model = moe_model(family, demo)
    r, metric = projection(model)
    length = model.prepare([CLEAN]).length
    l = moe.moe_layers(model.module)[-1]
    n = moe.moe_layer(model.module, l).n_experts
    pos = ii.expert_sweep(model, CLEAN, CORRUPT, metric, site="expert_out_pos",
                          direction="noising", layers=[l], positions=[-1, -3])
    assert pos.dims == ("layer", "pos", "expert") and pos.positions == [length - 1, length - 3]
    ablated = ii.expert_sweep(model, CLEAN, None, metric, method="ablation", layers=[l])
    assert ablated.direction == "ablation"
    for e in range(n):
        for pi, p in enumerate((-1, -3)):
            want = [oracle(model, c, s, l, e, p, r) for c, s in zip(CLEAN, CORRUPT)]
            torch.testing.assert_close(pos.per_prompt[0, pi, e], torch.tensor(want), **TOL)
        want = [oracle(model, c, None, l, e, None, r) for c in CLEAN]
        torch.testing.assert_close(ablated.per_prompt[0, e], torch.tensor(want), **TOL)
    torch.testing.assert_close(ablated.values, ablated.raw - ablated.clean)
    assert "E" in repr(ablated) and ablated.top(1)[0]["expert"] in range(n)


def test_sweep_options_are_checked(demo):
    model = moe_model("mixtral", demo)
    _, metric = projection(model)
    with pytest.raises(InputError, match="unknown expert site 'experts'"):
        ii.expert_sweep(model, CLEAN, CORRUPT, metric, site="experts")
    with pytest.raises(InputError, match="method='activation' needs corrupted prompts"):
        ii.expert_sweep(model, CLEAN, None, metric)
    with pytest.raises(InputError, match="positions= needs site='expert_out_pos'"):
        ii.expert_sweep(model, CLEAN, CORRUPT, metric, positions=[-1])
    with pytest.raises(InputError, match="method='attribution'"):
        ii.expert_sweep(model, CLEAN, CORRUPT, metric, method="attribution")


@torch.no_grad()
def test_bf16_sweeps_do_not_depend_on_the_chunking(demo):
    from tests.test_moe_oracle import BASE, CONFIGS, tiny_family
    module = tiny_family("deepseek_v3", len(demo.tokenizer),
                         **{**BASE, **CONFIGS["deepseek_v3"]}).to(torch.bfloat16)
    model = ii.wrap(module, demo.tokenizer)
    r, _ = projection(model)
    metric = lambda logits: logits[:, -1].float() @ r                         # noqa: E731
    small, large = (ii.expert_sweep(model, CLEAN, CORRUPT, metric, batch_size=b)
                    for b in (3, 64))
    assert torch.equal(small.per_prompt, large.per_prompt)
    assert small.values.dtype == torch.float32 and small.values.isfinite().all()


def test_patch_sweep_serves_expert_sites_with_heads_as_experts(demo):
    """``ii.patch_sweep(site="expert_out")`` runs the expert sweep (checked against a
    per-prompt loop above); methods it has no runner for are refused by name."""
    model = moe_model("mixtral", demo)
    _, metric = projection(model)
    got = ii.patch_sweep(model, CLEAN, CORRUPT, metric, site="expert_out", layers=[1],
                         heads=[1, 3])
    want = ii.expert_sweep(model, CLEAN, CORRUPT, metric, layers=[1], experts=[1, 3])
    assert got.experts == [1, 3] and torch.equal(got.per_prompt, want.per_prompt)
    for method in ("attribution", "atp*", "path"):
        with pytest.raises(InputError, match=re.escape(f"method='{method}'") + " does not apply to site "
                                             "'expert_out'; its methods: activation$"):
            ii.patch_sweep(model, CLEAN, CORRUPT, metric, site="expert_out", method=method)


def test_an_expert_sweep_shows_a_heatmap_live_and_as_a_static_image(demo):
    model = moe_model("mixtral", demo)
    _, metric = projection(model)
    bundle = ii.expert_sweep(model, CLEAN, CORRUPT, metric)._repr_mimebundle_()
    assert bundle["image/svg+xml"].startswith("<svg") and "<script" in bundle["text/html"]
    assert bundle["text/plain"].startswith("ExpertSweepResult(activation")
