"""Attribution graphs: what they refuse (bad transcoders, prompts, node ids and edits), the
transcoder formats (SAELens folders, Gemma Scope's params.npz, the demo's), pruning and paths."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

import ipy_intervene as ii
from ipy_intervene.circuit import graph_intervene as gi
from ipy_intervene.features.saelens import save_sae
from ipy_intervene.features.transcoders import load_transcoder, load_transcoders
from tests.test_attribution_graph import PROMPTS, random_transcoders

MARY = PROMPTS[2]


@pytest.fixture(scope="module")
def tcs():
    return random_transcoders(4, 128, seed=5)


@pytest.fixture(scope="module")
def graph(demo, tcs):
    return ii.attribution_graph(demo, MARY, tcs)


@pytest.mark.parametrize("make,why", [
    (lambda t: {**t, 7: t[0]}, "layer 7: this gpt2 model has layers 0 to 3"),
    (lambda t: {k: v for k, v in t.items() if k != 2}, "no transcoder for layer 2"),
    (lambda t: {**t, 1: random_transcoders(1, 64)[0]}, "reads width 64 and writes width 64"),
    (lambda t: {**t, 1: torch.nn.Linear(2, 2)}, "has no `encode`"),
    (lambda t: 3, "transcoders= is a dict"),
])
def test_bad_transcoders_are_refused(demo, tcs, make, why):
    with pytest.raises(ii.InterventionError, match=re.escape(why)):
        ii.attribution_graph(demo, MARY, make(tcs))


def test_an_sae_is_not_a_transcoder(demo, tcs):
    from ipy_intervene.features.sae import SAE

    with pytest.raises(ii.InterventionError, match="subtracts b_dec"):
        ii.attribution_graph(demo, MARY, {**tcs, 0: SAE(128, 16)})


def test_bad_prompts_and_options_are_refused(demo, tcs):
    with pytest.raises(ii.InterventionError, match="this model has 64 positions"):
        ii.attribution_graph(demo, " Mary" * 70, tcs)
    with pytest.raises(ii.InterventionError, match="one prompt"):
        ii.attribution_graph(demo, [MARY, MARY], tcs)
    with pytest.raises(ii.InterventionError, match="batch_size"):
        ii.attribution_graph(demo, MARY, tcs, batch_size=0)
    with pytest.raises(ii.InterventionError, match="logit_share"):
        ii.attribution_graph(demo, MARY, tcs, logit_share=0)


def test_edits_are_checked(graph):
    for bad, why in [({"f9.0.0": 0}, "layers 0 to 3"), ({"t99": ("scale", 0)}, "position"),
                     ({"zz": 0}, "not a node id"), ({"e0.0": 1.0}, "takes ('scale', c)"),
                     ({graph.ids[-1]: 0}, "output node"),
                     ({graph.ids[0]: "x"}, "expected a number")]:
        with pytest.raises(ii.InterventionError, match=re.escape(why)):
            gi.parse_edits(graph.nodes, bad)
    with pytest.raises(ii.InterventionError, match="errors="):
        graph.intervene({graph.ids[0]: 0}, errors="maybe")


def test_scaling_nodes_is_predicted_exactly_in_the_frozen_model(graph):
    n = graph.nodes
    edits = {graph.ids[0]: ("scale", 3.0), f"e1.{n.n_pos - 1}": ("scale", 0.0),
             "t1": ("scale", 0.5), graph.ids[len(n.features) // 2]: 2.5}
    r = graph.intervene(edits)
    assert torch.allclose(r.predicted, r.frozen, atol=1e-4, rtol=1e-5)
    assert float((r.after - r.before).abs().max()) > 0


def test_pruning_keeps_tokens_and_outputs_and_paths_end_at_outputs(graph):
    p = graph.prune(node_threshold=0.9, edge_threshold=0.95)
    n = graph.nodes
    assert p.node_mask[n.token_start:].all()
    assert 0 < int(p.node_mask[:len(n.features)].sum()) < len(n.features)
    kept = set(p.kept)
    assert all(s in kept and t in kept for s, t, _ in p.edges())
    paths = p.top_paths(3)
    assert paths and all(path[0].startswith("t") and path[-1].startswith("logit:")
                         for _, path in paths)
    assert [s for s, _ in paths] == sorted((s for s, _ in paths), reverse=True)
    with pytest.raises(ii.InterventionError, match="in \\[0, 1\\]"):
        graph.prune(node_threshold=1.5)
    assert 0 <= graph.replacement_score <= 1 and 0 <= graph.completeness_score <= 1


def test_saelens_transcoder_folders_round_trip(tmp_path, demo, tcs):
    for layer, tc in tcs.items():
        save_sae(tc, tmp_path / f"layer_{layer}", hook_name=f"transformer.h[{layer}].mlp")
    cfg = json.loads((tmp_path / "layer_0" / "cfg.json").read_text())
    assert cfg["architecture"] == "transcoder" and cfg["d_out"] == 128
    back = load_transcoders(tmp_path)
    a = ii.attribution_graph(demo, MARY, tcs)
    b = ii.attribution_graph(demo, MARY, str(tmp_path))
    assert sorted(back) == [0, 1, 2, 3] and torch.equal(a.adjacency, b.adjacency)


def _gemma_scope(folder, d=128, d_sae=32, **extra):
    folder.mkdir(parents=True)
    gen = np.random.default_rng(0)
    arrays = dict(W_enc=gen.normal(size=(d, d_sae)), W_dec=gen.normal(size=(d_sae, d)),
                  b_enc=gen.normal(size=d_sae), b_dec=gen.normal(size=d),
                  threshold=np.abs(gen.normal(size=d_sae)), **extra)
    np.savez(folder / "params.npz", **{k: v.astype(np.float32) for k, v in arrays.items()})
    return arrays


def test_gemma_scope_layout_loads_as_a_jumprelu_transcoder(tmp_path):
    arrays = _gemma_scope(tmp_path / "layer_0" / "width_16k" / "average_l0_50")
    tc = load_transcoders(tmp_path)[0]
    x = torch.randn(3, 128)
    pre = x @ torch.tensor(arrays["W_enc"], dtype=torch.float32) + \
        torch.tensor(arrays["b_enc"], dtype=torch.float32)
    want = torch.relu(pre) * (pre > torch.tensor(arrays["threshold"], dtype=torch.float32))
    assert tc.activation == "jumprelu" and not tc.apply_b_dec_to_input
    assert torch.allclose(tc.encode(x), want)


def test_gemma_scope_files_it_does_not_understand_are_refused(tmp_path):
    _gemma_scope(tmp_path / "skip", W_skip=np.zeros((128, 128)))
    with pytest.raises(ii.InterventionError, match="W_skip"):
        load_transcoder(tmp_path / "skip")
    _gemma_scope(tmp_path / "two" / "a")
    _gemma_scope(tmp_path / "two" / "b")
    with pytest.raises(ii.InterventionError, match="holds 2 params.npz"):
        load_transcoder(tmp_path / "two")
    (tmp_path / "none").mkdir()
    with pytest.raises(ii.InterventionError, match="no layer_<n>"):
        load_transcoders(tmp_path / "none")
    with pytest.raises(ii.InterventionError, match="no transcoder folder"):
        load_transcoders(tmp_path / "missing")


def test_the_view_is_one_static_svg_with_hover_text(graph):
    from ipy_intervene.circuit.graph_examples import top_activations

    p = graph.prune(node_threshold=0.9, edge_threshold=0.95)
    feats = [i for i in p.kept if i.startswith("f")]
    tops = top_activations(graph, PROMPTS, k=2, nodes=feats)
    assert all(t.value > 0 and "[" in t.context for v in tops.values() for t in v)
    view = graph.show(node_threshold=0.9, edge_threshold=0.95, groups={"mine": feats[:2]},
                      top_tokens=tops, max_edges=40)
    bundle = view._repr_mimebundle_()
    svg = bundle["image/svg+xml"]
    assert svg.startswith("<svg") and svg.rstrip().endswith("</svg>") and "<script" not in svg
    assert svg.count("<line") == min(40, len(p.edges()))
    assert "mine" in svg and "logits" in svg and "PrunedGraph" in bundle["text/plain"]
    for token in graph.nodes.tokens:
        assert __import__("html").escape(token.replace("\n", "\\n")[:9]) in svg
    with pytest.raises(ii.InterventionError, match="not a node id"):
        graph.show(groups={"bad": ["nope"]})
    big = graph.show(prune=False, max_edges=100).svg()   # every node, 100 edges
    assert big.count("<line") == 100


def test_the_view_gives_every_node_room(graph):
    """Nodes of a cell wrap into sub-rows and their position's column widens, so no two
    overlap (a cell too full for that says how many nodes it holds); output boxes do not
    overlap either."""
    def centres(svg: str) -> list[tuple[float, float]]:
        return [(float(x), float(y)) for x, y in
                re.findall(r'<circle cx="([\d.]+)" cy="([\d.]+)" r="5"', svg)]

    for view in (graph.show(node_threshold=0.95), graph.show(prune=False)):
        svg = view.svg()
        points = centres(svg)
        assert len(points) == sum(i.startswith("f") for i in
                                  (graph.ids[k] for k in view._kept()))
        if not view._crowded:
            gaps = [((x1 - x2) ** 2 + (y1 - y2) ** 2) ** 0.5 for k, (x1, y1) in
                    enumerate(points) for x2, y2 in points[k + 1:]]
            assert min(gaps) >= 10, min(gaps)
        else:
            assert svg.count(" nodes</text>") == len(view._crowded)
        boxes = sorted(float(x) for x in re.findall(r'<rect x="([\d.]+)" y="[\d.]+" '
                                                     r'width="60"', svg))
        assert len(boxes) == len(graph.nodes.logits)
        assert all(b - a >= 60 for a, b in zip(boxes, boxes[1:]))
