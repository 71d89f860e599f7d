"""The MoE sites a cell reads and writes (``mlp.router_logits``, ``mlp.experts_chosen``,
``mlp.router_weights``, ``mlp.experts[e]``): their hook points driven by
:func:`ipy_intervene.arch.moe.use_sites` in a HookSession, exactly as a trace drives them
(hooks on the points), on a left-padded batch against the per-prompt plain-hooks oracle;
then through ``%%trace`` itself once the envoys and the runtime know the points."""

from __future__ import annotations

import pytest
import torch

import ipy_intervene as ii
from ipy_intervene.arch import moe
from ipy_intervene.errors import InterventionError, SiteError
from ipy_intervene.infra.hooks import HookSession
from tests.conftest import hook_count
from tests.test_moe_oracle import CLEAN, family_model, ffn, hand_terms, moe_model, run_alone  # noqa: F401

TOL = dict(rtol=1e-5, atol=1e-5)


def drive(model: ii.Model, hooks: dict, batch) -> torch.Tensor:
    """One batched forward with ``hooks`` ({point: fn(x) -> new or None}) on MoE points."""
    with HookSession() as session:
        moe.use_sites(session, model.module)
        for p, fn in hooks.items():
            session.post(p, lambda m, a, out, fn=fn: fn(out))
        return model.module(**batch.kwargs).logits


def points(model: ii.Model, l: int) -> tuple[moe.MoeLayer, dict]:
    layer = moe.moe_layer(model.module, l)
    named = {name: moe.point(layer.block, name) for name in moe.MOE_SITES}
    named.update({e: moe.expert_point(layer.experts, e) for e in range(layer.n_experts)})
    return layer, named


@torch.no_grad()
def test_points_read_what_each_prompt_alone_sees(family_model):
    family, model = family_model
    l = moe.moe_layers(model.module)[-1]
    layer, named = points(model, l)
    seen: dict = {}
    batch = model.prepare([CLEAN])
    drive(model, {p: (lambda x, k=k: seen.__setitem__(k, x.clone())) for k, p in named.items()},
          batch)
    mask = batch.kwargs["attention_mask"].bool()
    for i, text in enumerate(CLEAN):
        alone, _ = run_alone(model, text, [l])
        real = mask[i]
        torch.testing.assert_close(seen["router_logits"][i][real],
                                   alone[l]["logits"].to(seen["router_logits"].dtype), **TOL)
        assert torch.equal(seen["experts_chosen"][i][real], alone[l]["index"])
        torch.testing.assert_close(seen["router_weights"][i][real], alone[l]["weights"], **TOL)
        terms = hand_terms(layer, alone[l])
        for e in range(layer.n_experts):
            torch.testing.assert_close(seen[e][i][real], terms[:, e], **TOL)
    assert seen["router_logits"].shape[:2] == mask.shape
    assert hook_count(model.module) == 0 and all(hook_count(p) == 0 for p in named.values())


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "gpt_oss", "deepseek_v3"])
@torch.no_grad()
def test_writing_an_expert_or_the_weights_changes_the_forward_exactly(demo, family):
    model = moe_model(family, demo)
    l = moe.moe_layers(model.module)[0]
    layer, named = points(model, l)
    batch = model.prepare([CLEAN])
    e = int(ii.routing(model, CLEAN, layers=[l]).chosen[l][0, -1, 1])

    def zero_last(x):
        x[:, -1] = 0                                  # ablate at the last position, in place

    def double(x):
        return 2 * x                                  # a new value at every position

    def halve(w):
        return w / 2

    cases = [({named[e]: zero_last}, lambda s, out: out - _last(term(layer, s, e))),
             ({named[e]: double}, lambda s, out: out + term(layer, s, e)),
             ({named["router_weights"]: halve}, lambda s, out: out / 2)]
    for hooks, hand in cases:
        logits = drive(model, hooks, batch)
        for i, text in enumerate(CLEAN):
            _, want = run_alone(model, text, [l], edit=lambda at, s, out: hand(s, out))
            torch.testing.assert_close(logits[i, -len(want):], want, **TOL)
    assert hook_count(model.module) == 0


def term(layer: moe.MoeLayer, seen: dict, e: int) -> torch.Tensor:
    w = (seen["weights"] * (seen["index"] == e)).sum(-1, keepdim=True).to(seen["x"].dtype)
    return w * ffn(layer, seen["x"], e)


def _last(x: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(x)
    out[-1] = x[-1]
    return out


@torch.no_grad()
def test_the_router_logits_and_chosen_experts_are_read_only(demo):
    model = moe_model("olmoe", demo)
    _, named = points(model, 1)
    batch = model.prepare([CLEAN])
    for name in ("router_logits", "experts_chosen"):
        with pytest.raises(SiteError, match=f"model.layers\\[1\\].mlp.{name} is read-only: the "
                                            "olmoe router has already chosen.*router_weights"):
            drive(model, {named[name]: lambda x: x + 1}, batch)
    assert hook_count(model.module) == 0


def _wired(model: ii.Model) -> bool:
    try:
        model.model.layers[1].mlp.router_logits
        model.model.layers[1].mlp.experts[0]
    except InterventionError:
        return False
    return True


@torch.no_grad()
def test_a_trace_cell_reads_and_ablates_an_expert(demo):
    model = moe_model("mixtral", demo)
    if not _wired(model):
        pytest.skip("the envoys/runtime do not route MoE sites yet (arch.moe.point, "
                    "expert_point and use_sites are there to be wired)")
    layer, _ = points(model, 1)
    ns = {"model": model}
    ii.trace(model, "logits_in = model.model.layers[1].mlp.router_logits.output\n"
             "model.model.layers[1].mlp.experts[2].output[:, -1] = 0\n"
             "out = model.lm_head.output", CLEAN, namespace=ns)
    for i, text in enumerate(CLEAN):
        alone, want = run_alone(model, text, [1], edit=lambda at, s, out: out - _last(
            term(layer, s, 2)))
        torch.testing.assert_close(ns["out"][i, -len(want):], want, **TOL)
        torch.testing.assert_close(ns["logits_in"][i, -len(want):], alone[1]["logits"], **TOL)
