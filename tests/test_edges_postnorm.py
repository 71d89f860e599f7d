"""Edge attribution and exact circuit runs on the post-norm families (Gemma 2, Gemma 3, OLMo 2,
OLMo 3: a norm after attention and after the MLP; OLMo 2/3 also without pre-norms). There
attention's write into the stream is ``post_attention_layernorm(o_proj(z of all heads))``, not
a sum over heads, so its sender is the whole layer, ``ATTN{l}`` (that norm's output), and
``MLP{l}`` is the post-feedforward norm's output; receivers stay per head. Each number is
checked against plain hooks on one prompt at a time, for a left-padded batch of three prompts
of different lengths: EAP and EAP-IG against their closed form (tests/family_eap.py), single
patched edges and circuits against a hand-patched forward. Gemma 4 (a writer after the MLP,
a scale on the whole stream) and DeepSeek V3 (no per-head q/k/v) stay refused."""

from __future__ import annotations

import pytest
import torch

import ipy_intervene as ii
from ipy_intervene.circuit import Circuit, patch_edges, verify_circuit
from ipy_intervene.errors import SiteError

import family_matrix as fm
import family_oracles as o
from conftest import hook_count
from family_eap import Parts, eap_scores, grads, writes

FAMILIES = ["gemma2", "gemma3_text", "olmo2", "olmo3"]
METRIC = ii.logit_diff(o.GOOD, o.BAD)


@pytest.fixture(scope="module", params=FAMILIES)
def fam(request):
    model = fm.model_of(request.param)
    if isinstance(model, str):
        pytest.skip(model)
    model.module.set_attn_implementation("eager")
    return request.param, model


def test_the_graph_names_attention_s_whole_write_as_one_sender(fam):
    name, model = fam
    r = ii.edge_attribution(model, o.ids(o.CLEAN), o.ids(o.CORRUPT), METRIC)
    g = r.graph
    assert [n.name for n in g.senders] == ["embed", "ATTN0", "MLP0", "ATTN1", "MLP1"]
    assert [n.role for n in g.senders] == ["embed", "attn", "mlp", "attn", "mlp"]
    assert g.receivers[0].name == "L0H0.q" and g.receivers[-1].name == "logits"
    assert bool(g.upstream[g.sender_index("ATTN0"), g.receiver_index("MLP0")])
    assert not bool(g.upstream[g.sender_index("ATTN1"), g.receiver_index("L1H0.q")])
    svg_source = r.circuit(top=8).show().dot()
    assert "ATTN" in svg_source or "MLP" in svg_source
    assert hook_count(model.module) == 0


def test_eap_equals_its_closed_form_one_prompt_at_a_time(fam):
    name, model = fam
    result = ii.edge_attribution(model, o.ids(o.CLEAN), o.ids(o.CORRUPT), METRIC)
    want, mask = eap_scores(model.module, ii.adapter_for(model), result.graph)
    assert torch.equal(~result.scores.isnan(), mask)
    o.close(result.scores.nan_to_num(), want.nan_to_num(), f"{name} EAP scores")
    assert float(want.nan_to_num().abs().max()) > 1e-2


def test_eap_ig_equals_its_closed_form_one_prompt_at_a_time(fam):
    name, model = fam
    steps = 3
    result = ii.edge_attribution(model, o.ids(o.CLEAN), o.ids(o.CORRUPT), METRIC,
                                 method="eap-ig", steps=steps)
    graph, parts = result.graph, Parts(model.module, ii.adapter_for(model))
    want = torch.zeros(len(o.CLEAN), len(graph.senders), len(graph.receivers))
    for p, (clean, corrupt) in enumerate(zip(o.CLEAN, o.CORRUPT)):
        wc, wk = writes(parts, clean), writes(parts, corrupt)
        total = None
        for k in range(steps):
            point = wk["embed"] + k / steps * (wc["embed"] - wk["embed"])
            g = grads(parts, corrupt, embed=point)
            total = g if total is None else {n: total[n] + g[n] for n in g}
        for s, send in enumerate(graph.senders):
            diff = wc[send.name] - wk[send.name]
            for r, recv in enumerate(graph.receivers):
                want[p, s, r] = float((diff * total[recv.name]).sum()) / steps
    want = want * graph.upstream
    o.close(result.per_prompt, want, f"{name} EAP-IG per prompt")
    assert float(want.abs().max()) > 1e-2


# -- circuits: a hand-patched forward, one prompt alone ----------------------------------------


def patched_by_hand(parts, prompt, source, removed):
    """The metric of one prompt where receiver v reads ``source_u`` instead of this run's
    ``u`` write for each ``(u, v)`` in ``removed``: v's input is the stream plus the sum of
    ``source_u - current_u`` (current: u's write in this same run)."""
    a, current, seen, pre, post = parts.a, {}, {}, [], []

    def delta(receiver):
        parts_ = [source[u] - current[u] for u, v in removed if v == receiver]
        return sum(parts_) if parts_ else None

    def block0(x):
        current["embed"] = x
    pre.append((parts.blocks[0], block0))
    for l in range(parts.n):
        pre.append((parts.part(l, a.attn_norm or a.attn),
                    lambda x, l=l: seen.__setitem__(("attn", l), x)))
        for path in dict.fromkeys(a.qkv):
            module = parts.part(l, path)

            def rewrite(out, l=l, path=path, module=module):
                out = out.clone()
                for name, kind, layer, i in parts.receivers():
                    d = delta(name) if layer == l and kind in "qkv" else None
                    if d is None or parts.proj(l, kind)[0] != path:
                        continue
                    cols = parts.proj(l, kind)[1](i)
                    bias = module.bias[cols] if module.bias is not None else 0
                    x = parts.attn_normed(l, seen[("attn", l)] + d)
                    out[..., cols] = x @ parts.weight(l, path)[cols].T + bias
                return out
            post.append((module, rewrite))
        post.append((parts.part(l, a.post_attn_norm),
                     lambda out, l=l: current.__setitem__(f"ATTN{l}", out)))
        if parts.mlp_norm is None:
            pre.append((parts.part(l, a.mlp), lambda x, l=l: (
                None if delta(f"MLP{l}") is None else x + delta(f"MLP{l}"))))
        else:
            norm = parts.part(l, parts.mlp_norm)
            pre.append((norm, lambda x, l=l: seen.__setitem__(("mlp", l), x)))
            pre.append((parts.part(l, a.mlp), lambda x, l=l, norm=norm: (
                None if delta(f"MLP{l}") is None else norm.forward(seen[("mlp", l)] + delta(f"MLP{l}")))))
        post.append((parts.part(l, a.post_mlp_norm),
                     lambda out, l=l: current.__setitem__(f"MLP{l}", out)))
    pre.append((parts.final, lambda x: None if delta("logits") is None else x + delta("logits")))
    return o.metric(o.logits_alone(parts.root, prompt, pre, post))[0]


def by_hand(model, graph, base, source, removed):
    parts = Parts(model.module, ii.adapter_for(model))
    return torch.stack([patched_by_hand(parts, b, writes(parts, s), removed)
                        for b, s in zip(base, source)])


def some_edges(graph):
    """One edge into each kind of receiver from each kind of sender."""
    picked, seen = [], set()
    for s, r in graph.upstream.nonzero().tolist():
        key = (graph.senders[s].role, graph.receivers[r].role)
        if key not in seen:
            seen.add(key)
            picked.append((graph.senders[s].name, graph.receivers[r].name))
    return picked


def test_patched_edges_equal_a_hand_patched_forward(fam):
    name, model = fam
    graph = ii.edge_attribution(model, o.ids(o.CLEAN), o.ids(o.CORRUPT), METRIC).graph
    edges = some_edges(graph)
    assert {s for s, _ in edges} >= {"embed", "ATTN0", "MLP0"}
    assert {graph.receivers[graph.receiver_index(r)].role for _, r in edges} == {
        "q", "k", "v", "mlp", "logits"}
    base = by_hand(model, graph, o.CORRUPT, o.CLEAN, [])       # nothing patched
    effects = []
    for edge in edges:
        got = patch_edges(model, o.ids(o.CORRUPT), o.ids(o.CLEAN), METRIC, [edge])
        want = by_hand(model, graph, o.CORRUPT, o.CLEAN, [edge])
        o.close(got, want, f"{name}: patching {edge[0]} -> {edge[1]}")
        effects.append(want)
        if edge[0].startswith("ATTN"):          # the sender of a post-norm layer moves it
            assert float((want - base).abs().max()) > 1e-4, edge
    got = patch_edges(model, o.ids(o.CORRUPT), o.ids(o.CLEAN), METRIC, edges)
    o.close(got, by_hand(model, graph, o.CORRUPT, o.CLEAN, edges), f"{name}: all at once")
    assert float((torch.stack(effects) - base).abs().max()) > 1e-2
    assert hook_count(model.module) == 0


def test_circuits_equal_a_hand_patched_forward(fam):
    name, model = fam
    result = ii.edge_attribution(model, o.ids(o.CLEAN), o.ids(o.CORRUPT), METRIC)
    graph = result.graph
    for top in (5, graph.n_edges // 3):
        circuit = result.circuit(top=top)
        removed = [(graph.senders[s].name, graph.receivers[r].name)
                   for s, r in (graph.upstream & ~circuit.mask).nonzero().tolist()]
        got = circuit.verify()
        want = by_hand(model, graph, o.CLEAN, o.CORRUPT, removed)
        o.close(got.per_prompt, want, f"{name}: the top-{top} circuit, prompt by prompt")
    full = Circuit.full(graph).verify(model, o.ids(o.CLEAN), o.ids(o.CORRUPT), METRIC)
    empty = verify_circuit(model, Circuit.empty(graph), o.ids(o.CLEAN), o.ids(o.CORRUPT),
                           METRIC)
    assert abs(result.clean_metric - result.corrupted_metric) > 1e-3
    assert full.circuit_metric == pytest.approx(result.clean_metric, abs=1e-5)
    assert empty.circuit_metric == pytest.approx(result.corrupted_metric, abs=1e-5)
    assert full.recovered == pytest.approx(1.0, abs=1e-5)
    assert hook_count(model.module) == 0


@pytest.mark.parametrize("family, match", [
    ("gemma4_text", r"edge attribution reads the residual stream as the sum .* gemma4_text "
                    r"block also has the output of post_per_layer_input_norm"),
    ("deepseek_v3", r"edge attribution needs, for the 'deepseek_v3' map, .* missing: qkv")])
def test_gemma4_and_deepseek_v3_stay_refused(family, match):
    model = fm.model_of(family)
    if isinstance(model, str):
        pytest.skip(model)
    with pytest.raises(SiteError, match=match):
        ii.edge_attribution(model, o.ids(o.CLEAN), o.ids(o.CORRUPT), METRIC)
    assert hook_count(model.module) == 0


def test_a_hand_map_saying_attention_reads_the_stream_unnormed_is_refused_where_it_is_normed():
    """Gemma 2 reads the stream through input_layernorm: a map stating no pre-norm
    (attn_norm = the attention module, as OLMo 2's layout has it) fails the read check."""
    from dataclasses import replace

    model = fm.model_of("gemma2")
    if isinstance(model, str):
        pytest.skip(model)
    wrong = replace(ii.adapter_for(model), attn_norm="self_attn")
    with pytest.raises(SiteError, match=r"the 'gemma2' map says self_attn.q_proj reads "
                                        r"attn_norm='self_attn'"):
        ii.edge_attribution(model, o.ids(o.CLEAN), o.ids(o.CORRUPT), METRIC, adapter=wrong)
    assert hook_count(model.module) == 0


def test_a_hand_adapter_equal_to_olmo2_s_map_gives_the_same_scores():
    from dataclasses import fields

    model = fm.model_of("olmo2")
    if isinstance(model, str):
        pytest.skip(model)
    table = ii.adapter_for(model)
    hand = ii.Adapter("mine", **{f.name: getattr(table, f.name) for f in fields(table)
                                 if f.name not in ("name", "n_layers")})
    want = ii.edge_attribution(model, o.ids(o.CLEAN), o.ids(o.CORRUPT), METRIC)
    got = ii.edge_attribution(model, o.ids(o.CLEAN), o.ids(o.CORRUPT), METRIC, adapter=hand)
    assert [n.name for n in got.graph.senders] == [n.name for n in want.graph.senders]
    assert torch.equal(got.per_prompt, want.per_prompt)
