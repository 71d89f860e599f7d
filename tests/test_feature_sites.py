"""Transcoders and custom sites (direction, subspace, neurons, functions) spliced as
dictionaries: their coordinates in %%trace equal plain hooks run one prompt at a time."""

from __future__ import annotations

import pytest
import torch

import ipy_intervene as ii
from ipy_intervene.errors import InputError, InterventionError
from ipy_intervene.features import SAE, attach, detach
from ipy_intervene.features.dictionaries import Custom, Direction, Neurons, Subspace
from tests.conftest import LAYERS, PROMPT, SHORT, hook_count, hooks, tiny_model

PROMPTS = [PROMPT, SHORT]
ACT = {"gpt2": "act", "neox": "act", "llama": "act_fn"}


@pytest.fixture(params=["gpt2", "neox", "llama", "demo"])
def case(request, demo):
    if request.param == "demo":
        return "gpt2", demo
    arch = request.param
    return arch, ii.wrap(tiny_model(arch, len(demo.tokenizer)), demo.tokenizer)


def path(arch: str, tail: str = "") -> str:
    top, name = LAYERS[arch]
    return f"{top}.{name}[1]{tail}"


def module_at(model, dotted: str):
    return model.module.get_submodule(dotted.replace("[", ".").replace("]", ""))


def run_each(model, where: str, hook):
    """Logits of each prompt alone, with a plain forward hook on ``where``."""
    out = []
    for prompt in PROMPTS:
        ids = model.tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad(), hooks((module_at(model, where), hook)):
            out.append(model.module(ids).logits[0])
    return out


def check(ns_logits, expected):
    for row, want in enumerate(expected):
        torch.testing.assert_close(ns_logits[row, -want.shape[0]:], want, atol=1e-5, rtol=0)


def first(out):
    return out[0] if isinstance(out, tuple) else out


def put(out, new):
    return (new, *out[1:]) if isinstance(out, tuple) else new


def traced(model, source):
    ns = {}
    before = hook_count(model.module)
    ii.trace(model, source, PROMPTS, namespace=ns)
    assert hook_count(model.module) == before
    return ns


def test_transcoder_reads_the_input_and_replaces_the_output(case):
    arch, model = case
    width = model.module.config.hidden_size
    gen = torch.Generator().manual_seed(1)
    tc = SAE(width, 48, apply_b_dec_to_input=False)
    with torch.no_grad():
        for p in tc.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        tc.b_enc.add_(1.0)
    mlp = path(arch, ".mlp")
    attach(model, mlp, tc, name="tc", kind="transcoder")
    try:
        plain = traced(model, "logits = model.lm_head.output")
        src = f"model.{mlp}.tc.latents.output[:, -1, :8] = 0\nlogits = model.lm_head.output"
        ns = traced(model, src)
    finally:
        detach(model)
    unspliced = traced(model, "logits = model.lm_head.output")
    assert torch.equal(plain["logits"], unspliced["logits"])  # kept error: unchanged

    def by_hand(m, args, out):
        lat = torch.relu(args[0] @ tc.W_enc + tc.b_enc)
        error = out - (lat @ tc.W_dec + tc.b_dec)
        lat[:, -1, :8] = 0
        return lat @ tc.W_dec + tc.b_dec + error

    expected = run_each(model, mlp, by_hand)
    check(ns["logits"], expected)
    assert not torch.allclose(ns["logits"], plain["logits"], atol=1e-3)


def test_direction_coordinate_is_set_exactly(case):
    arch, model = case
    width = model.module.config.hidden_size
    v = torch.randn(width, generator=torch.Generator().manual_seed(2))
    attach(model, path(arch), Direction(v), name="dir")
    try:
        ns = traced(model, f"c = model.{path(arch)}.dir.latents.output\n"
                           f"model.{path(arch)}.dir.latents.output[:, -1] = 2.0\n"
                           "logits = model.lm_head.output")
    finally:
        detach(model)
    u = v / v.norm()
    seen = []

    def by_hand(m, args, out):
        x = first(out).clone()
        seen.append(x @ u)
        x[:, -1] += (2.0 - x[:, -1] @ u)[..., None] * u
        return put(out, x)

    check(ns["logits"], run_each(model, path(arch), by_hand))
    assert ns["c"].shape == (2, ns["logits"].shape[1], 1)
    for row, coord in enumerate(seen):
        torch.testing.assert_close(ns["c"][row, -coord.shape[1]:-1, 0], coord[0, :-1],
                                   atol=1e-5, rtol=1e-6)


def test_subspace_projected_out_everywhere(case):
    arch, model = case
    width = model.module.config.hidden_size
    basis = torch.randn(3, width, generator=torch.Generator().manual_seed(3))
    attach(model, path(arch), Subspace(basis), name="sub")
    try:
        ns = traced(model, f"model.{path(arch)}.sub.latents.output[:] = 0\n"
                           "logits = model.lm_head.output")
    finally:
        detach(model)
    q, _ = torch.linalg.qr(basis.T)  # [width, 3], orthonormal columns spanning the rows

    def by_hand(m, args, out):
        x = first(out)
        return put(out, x - (x @ q) @ q.T)

    check(ns["logits"], run_each(model, path(arch), by_hand))


def test_neurons_set_and_the_rest_untouched(case):
    arch, model = case
    act = path(arch, f".mlp.{ACT[arch]}")
    width = _mlp_width(model, arch)
    attach(model, act, Neurons([3, 7], width), name="n")
    try:
        ns = traced(model, f"model.{act}.n.latents.output[:, -1] = 1.5\n"
                           "logits = model.lm_head.output")
    finally:
        detach(model)

    def by_hand(m, args, out):
        out = out.clone()
        out[:, -1, [3, 7]] = 1.5
        return out

    check(ns["logits"], run_each(model, act, by_hand))


def _mlp_width(model, arch: str) -> int:
    cfg = model.module.config
    if arch == "gpt2":
        return cfg.n_inner or 4 * cfg.n_embd
    return cfg.intermediate_size


def test_custom_functions_as_a_site(demo):
    site = Custom(lambda x: x[..., :4] * 2, lambda c: torch.nn.functional.pad(c / 2, (0, 124)))
    attach(demo, "transformer.h[1]", site, name="first4")
    try:
        ns = traced(demo, "model.transformer.h[1].first4.latents.output[:, -1, 0] = 3.0\n"
                          "logits = model.lm_head.output")
    finally:
        detach(demo)

    def by_hand(m, args, out):
        x = first(out).clone()
        x[:, -1, 0] = 1.5
        return put(out, x)

    check(ns["logits"], run_each(demo, "transformer.h[1]", by_hand))


def test_bad_sites_are_clear_errors(demo):
    with pytest.raises(InputError, match="linearly dependent"):
        Subspace(torch.ones(2, 8))
    with pytest.raises(InputError, match="norm 0"):
        Direction(torch.zeros(8))
    with pytest.raises(InputError, match="0..7"):
        Neurons([1, 8], 8)
    before = hook_count(demo.module)
    attach(demo, "transformer.h[1]", Direction(torch.ones(64)), name="dir")
    try:
        with pytest.raises(InterventionError, match="lives in 64 dimensions") as err:
            ii.trace(demo, "x = 1\nlogits = model.lm_head.output", PROMPT)
        assert "transformer.h[1]" in str(err.value)
    finally:
        detach(demo)
    assert hook_count(demo.module) == before


def test_a_direction_from_a_weight_row_holds_no_graph(demo):
    v = demo.module.lm_head.weight[demo.token_id("Mary")] - demo.module.lm_head.weight[
        demo.token_id("John")]
    assert v.requires_grad
    d = Direction(v)
    assert not d.v.requires_grad and d.v.grad_fn is None
    torch.testing.assert_close(d.v, (v / v.norm()).detach())
