"""Interventions from an attribution graph inside a trace cell (``g.apply(model, edits)``):
the cell's logits equal ``g.intervene``'s unfrozen model on the graph's prompt, and, with
``errors="live"``, a plain-hooks oracle run one prompt at a time on a left-padded batch of
prompts of different lengths (positions from each prompt's start or end), on the demo
model, a Llama and a Gemma 2 (its post-MLP norm: the transcoder writes the norm's output)."""

from __future__ import annotations

import re

import pytest
import torch

import ipy_intervene as ii
from tests.test_attribution_graph import (PROMPTS, TINY, parts, random_transcoders,
                                          scrambled_norms)
from tests.conftest import hook_count, tiny_model

GRAPH_PROMPT = PROMPTS[0]
BATCH = [PROMPTS[0], PROMPTS[2], PROMPTS[1]]   # 15, 5 and 11 tokens: left-padded
# tracer.output: the model's logits (after Gemma 2's soft-cap; lm_head.output is before it)
CELL = "g.apply(model, edits, errors=errors, align=align)\nlogits = tracer.output\n"


@pytest.fixture(scope="module", params=["demo", "llama", "gemma2"])
def case(request, demo):
    if request.param == "demo":
        model, tcs = demo, random_transcoders(4, 128, seed=5)
    else:
        make = TINY.get(request.param, lambda vocab: tiny_model(request.param, vocab))
        # float32 Gemma 2: transformers' own float64 eager Gemma 2 gives NaN on a left-padded
        # batch (hooks or not); Llama in float64
        dtype = torch.float32 if request.param == "gemma2" else torch.float64
        model = ii.wrap(scrambled_norms(make(len(demo.tokenizer))).to(dtype), demo.tokenizer)
        tcs = random_transcoders(3, 32, seed=3, dtype=dtype)
    return request.param, model, tcs, ii.attribution_graph(model, GRAPH_PROMPT, tcs)


def tol(model) -> dict:
    wide = next(model.module.parameters()).dtype == torch.float64
    # a float64 model's norms still round to float32 (Llama's, Gemma's): 1e-6, not 1e-9
    return dict(atol=1e-6, rtol=1e-6) if wide else dict(atol=1e-5, rtol=1e-5)


def edits_at(g, positions: list[int]) -> dict:
    """A set, a scale and a zero of features at ``positions``, an error scaled to 0 and a
    token scaled by a half."""
    feats = [node for node in g.ids if node.startswith("f")
             and int(node.split(".")[1]) in positions]
    layers = sorted({int(node[1:].split(".")[0]) for node in feats})
    assert len(feats) >= 3 and len(layers) >= 2, feats
    picks = [feats[0], feats[len(feats) // 2], feats[-1]]
    return {picks[0]: 0.0, picks[1]: ("scale", 3.0), picks[2]: 2.5,
            f"e{layers[0]}.{positions[0]}": ("scale", 0.0), f"t{positions[-1]}": ("scale", 0.5)}


def run_cell(model, g, prompts, edits, errors="frozen", align="start") -> torch.Tensor:
    ns = {"g": g, "edits": edits, "errors": errors, "align": align}
    ii.trace(model, CELL, prompts, namespace=ns)
    return ns["logits"]


@torch.no_grad()
def oracle(model, tcs, prompt: str, edits: dict, align: str) -> torch.Tensor:
    """One prompt, plain hooks: each MLP's own output plus the change the edits make to
    relu(x W_enc + b_enc) W_dec + b_dec, an error node scaled by c adding (c - 1) times
    (output - transcoder output) at its position; token nodes scale block 0's input."""
    hf, n_graph = model.module, len(model.tokenizer(GRAPH_PROMPT)["input_ids"])
    ids = model.tokenizer(prompt, return_tensors="pt")["input_ids"]
    n = ids.shape[1]
    where = (lambda p: p) if align == "start" else (lambda p: n - (n_graph - p))
    blocks, _, mlps, _ = parts(hf)
    handles = []
    for layer, (inner, outer) in enumerate(mlps):
        tc, box = tcs[layer], []
        handles.append(inner.register_forward_hook(lambda m, a, o, box=box: box.append(a[0])))

        def hook(m, args, out, layer=layer, tc=tc, box=box):
            a = torch.relu(box.pop()[0] @ tc.W_enc + tc.b_enc)
            a2, dec = a.clone(), a @ tc.W_dec + tc.b_dec
            change = torch.zeros_like(dec)
            for node, how in edits.items():
                kind, rest = node[0], [int(v) for v in node[1:].split(".")]
                if kind == "f" and rest[0] == layer:
                    p, latent = where(rest[1]), rest[2]
                    a2[p, latent] = how if not isinstance(how, tuple) else a[p, latent] * how[1]
                if kind == "e" and rest[0] == layer:
                    change[where(rest[1])] += (how[1] - 1) * (out[0, where(rest[1])]
                                                              - dec[where(rest[1])])
            return out + ((a2 @ tc.W_dec + tc.b_dec) - dec + change)[None]
        handles.append(outer.register_forward_hook(hook))

    def scale(block, args, kwargs):
        x = (args[0] if args else kwargs["hidden_states"]).clone()
        for node, how in edits.items():
            if node[0] == "t":
                x[:, where(int(node[1:]))] *= how[1]
        return ((x, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": x})
    handles.append(blocks[0].register_forward_pre_hook(scale, with_kwargs=True))
    try:
        return hf(input_ids=ids).logits[0]
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("errors", ["frozen", "live"])
def test_the_cell_is_intervenes_unfrozen_model(case, errors):
    _, model, _, g = case
    edits = edits_at(g, [1, 2, 3, 4])
    logits = run_cell(model, g, GRAPH_PROMPT, edits, errors)
    r = g.intervene(edits, errors=errors)
    torch.testing.assert_close(logits[0, -1].double(), r.after.double(), **tol(model))
    assert float((r.after - r.before).abs().max()) > 1e-3  # the edits do something
    assert hook_count(model.module) == 0
    assert "replacement" in repr(g) and g.prune().kept  # float64 graphs too


@pytest.mark.parametrize("align", ["start", "end"])
def test_live_edits_on_prompts_of_different_lengths_equal_plain_hooks(case, align):
    name, model, tcs, g = case
    n = g.nodes.n_pos
    edits = edits_at(g, [1, 2, 3] if align == "start" else [n - 4, n - 3, n - 2, n - 1])
    logits = run_cell(model, g, BATCH, edits, "live", align)
    moved = 0.0
    for row, prompt in enumerate(BATCH):
        want = oracle(model, tcs, prompt, edits, align)
        got = logits[row, -want.shape[0]:]
        torch.testing.assert_close(got.double(), want.double(), **tol(model))
        plain = oracle(model, tcs, prompt, {}, align)
        moved = max(moved, float((want - plain).abs().max()))
    assert moved > 1e-3, name


def test_in_a_trace_magic_cell(shell):
    g = ii.attribution_graph(shell.user_ns["model"], GRAPH_PROMPT,
                             random_transcoders(4, 128, seed=5))
    edits = edits_at(g, [1, 2, 3, 4])
    shell.user_ns.update(g=g, edits=edits)
    shell.run_cell(f'%%trace model "{GRAPH_PROMPT}"\ng.apply(model, edits)\n'
                   "logits = tracer.output\n")
    torch.testing.assert_close(shell.user_ns["logits"][0, -1], g.intervene(edits).after,
                               atol=1e-5, rtol=1e-5)


def test_one_invoke_edited_beside_one_not(demo):
    tcs = random_transcoders(4, 128, seed=5)
    g = ii.attribution_graph(demo, GRAPH_PROMPT, tcs)
    edits = edits_at(g, [1, 2, 3])
    ns = {"g": g, "edits": edits, "a": GRAPH_PROMPT, "b": BATCH[1]}
    ii.trace(demo, "with tracer.invoke(a):\n    clean = tracer.output\n"
                   "with tracer.invoke(b):\n    g.apply(model, edits, errors='live')\n"
                   "    edited = tracer.output\n", namespace=ns)
    want = oracle(demo, tcs, BATCH[1], edits, "start")
    torch.testing.assert_close(ns["edited"][0], want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ns["clean"][0], oracle(demo, tcs, GRAPH_PROMPT, {}, "start"),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("prompts,kw,why", [
    (BATCH, {}, "every prompt of the trace must be the graph's prompt"),
    (BATCH, dict(errors="live", edits=lambda g: {"t9": ("scale", 0.0)}),
     "position 9 (of 15) is not in prompt 1 of this trace (6 tokens) counted from its start"),
    (GRAPH_PROMPT, dict(errors="maybe"), "errors='maybe'"),
    (GRAPH_PROMPT, dict(align="middle"), "align='middle'"),
    (GRAPH_PROMPT, dict(edits=lambda g: {"f9.0.0": 0}), "layers 0 to 3"),
])
def test_bad_applications_are_refused_and_leave_no_hooks(demo, prompts, kw, why):
    g = ii.attribution_graph(demo, GRAPH_PROMPT, random_transcoders(4, 128, seed=5))
    edits = kw.pop("edits", lambda g: {"t1": ("scale", 0.5)})(g)
    ns = {"g": g, "edits": edits, "errors": kw.get("errors", "frozen"),
          "align": kw.get("align", "start")}
    with pytest.raises(ii.InterventionError, match=re.escape(why)):
        ii.trace(demo, CELL, prompts, namespace=ns)
    assert "logits" not in ns and hook_count(demo.module) == 0
