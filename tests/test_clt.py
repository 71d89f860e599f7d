"""Attribution graphs with a cross-layer transcoder (one encoder per layer reading its MLP's
input, decoders from each layer to the MLP output of every later layer), checked exactly
against the frozen replacement model written by hand with plain hooks (the per-layer
oracle of tests/test_attribution_graph.py with the CLT's arithmetic by hand), on GPT-2-,
Llama- and Gemma-2-shaped random models with random CLTs, for prompts of several lengths:

(a) every target's input = its bias + the sum of its incoming edges;
(b) every edge = the change of its target's input when its source alone is removed;
(c) the graph's predicted ablation = the frozen model's; the unfrozen one = plain hooks;
and a CLT whose off-diagonal decoders are zero gives the per-layer transcoders' graph.
"""

from __future__ import annotations

import pytest
import torch

import ipy_intervene as ii
from ipy_intervene.features.clt import CrossLayerTranscoder
from ipy_intervene.features.sae import SAE
from tests.conftest import tiny_model
from tests.test_attribution_graph import (PROMPTS, TINY, Oracle, _all_errors_and_tokens,
                                          _unfrozen_oracle, close, ids_of, scrambled_norms)


def random_clt(n_layers: int, d: int, d_sae: int = 48, seed: int = 0,
               dtype: torch.dtype = torch.float64, cross: float = 1.0,
               jump: bool = False) -> CrossLayerTranscoder:
    """A ReLU (or JumpReLU) CLT with about a tenth of its latents active; ``cross`` scales
    the off-diagonal decoders (0: each feature writes its own layer only)."""
    gen = torch.Generator().manual_seed(seed)
    clt = CrossLayerTranscoder(n_layers, d, d_sae, dtype=dtype,
                               activation="jumprelu" if jump else "relu")
    with torch.no_grad():
        clt.W_enc.copy_(torch.randn(n_layers, d, d_sae, generator=gen) / d ** 0.5 * 2)
        clt.b_enc.copy_(torch.randn(n_layers, d_sae, generator=gen) * 0.3 - 1.5)
        clt.b_dec.copy_(torch.randn(n_layers, d, generator=gen) * 0.05)
        for s, w in enumerate(clt.W_dec):
            w.copy_(torch.randn(w.shape, generator=gen) * 0.1)
            w[:, 1:] *= cross
        if jump:
            clt.threshold.copy_(torch.rand(n_layers, d_sae, generator=gen) * 0.2)
    return clt.requires_grad_(False)


def diagonal(clt: CrossLayerTranscoder) -> dict[int, SAE]:
    """The per-layer transcoders made of a CLT's encoders and own-layer decoders."""
    out = {}
    for layer in range(clt.n_layers):
        tc = SAE(clt.d_model, clt.d_sae, apply_b_dec_to_input=False, dtype=clt.dtype)
        with torch.no_grad():
            tc.W_enc.copy_(clt.W_enc[layer])
            tc.b_enc.copy_(clt.b_enc[layer])
            tc.W_dec.copy_(clt.W_dec[layer][:, 0])
            tc.b_dec.copy_(clt.b_dec[layer])
        out[layer] = tc.requires_grad_(False)
    return out


class CltOracle(Oracle):
    """The per-layer oracle with the CLT's arithmetic by hand: pre-activations
    ``x @ W_enc[l] + b_enc[l]``; MLP ``l`` writes ``sum_{s <= l} a_s @ W_dec[s][:, l - s] +
    b_dec[l]`` (plus its error)."""

    def pre(self, layer, x):
        return x @ self.tcs.W_enc[layer] + self.tcs.b_enc[layer]

    def decode(self, layer, acts):
        out = self.tcs.b_dec[layer]
        for s in range(layer + 1):
            out = out + acts[s] @ self.tcs.W_dec[s][:, layer - s]
        return out


def wrapped(name: str, vocab_of):
    make = TINY.get(name, lambda vocab: tiny_model(name, vocab))
    return ii.wrap(scrambled_norms(make(len(vocab_of.tokenizer))).double(),
                   vocab_of.tokenizer)


@pytest.fixture(scope="module", params=["gpt2", "llama", "gemma2"])
def setup(request, demo):
    return request.param, wrapped(request.param, demo), random_clt(3, 32, seed=3)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_inputs_are_bias_plus_incoming_edges(setup, prompt):
    name, model, clt = setup
    g = ii.attribution_graph(model, prompt, clt)
    oracle = CltOracle(model.module, ids_of(model, prompt), clt)
    full = oracle.run()
    empty = oracle.run(acts={i: a * 0 for i, a in oracle.acts.items()},
                       drop=_all_errors_and_tokens(g))
    assert g.exactness() < 1e-8
    assert len(g.nodes.features) == sum(int((a != 0).sum()) for a in oracle.acts.values())
    for r, node in enumerate(g.target_rows.tolist()):
        value, bias = oracle.target(full, g, node), oracle.target(empty, g, node)
        assert close(float(g.values[r]), value, model), (name, g.ids[node])
        assert close(float(g.bias[r]), bias, model), (name, g.ids[node])
        assert close(bias + float(g.adjacency[node].double().sum()), value, model)
    assert torch.allclose(oracle.run()[1], oracle.unembedded, atol=1e-4)


@pytest.mark.parametrize("prompt", PROMPTS[:2])
def test_each_edge_is_the_change_when_its_source_is_removed(setup, prompt):
    name, model, clt = setup
    g = ii.attribution_graph(model, prompt, clt, batch_size=7)
    oracle = CltOracle(model.module, ids_of(model, prompt), clt)
    full = oracle.run()
    n = g.nodes
    spans = n.layer_spans()
    gen = torch.Generator().manual_seed(len(prompt))
    # layer-0 features write to all three MLPs: their edges go through every decoder
    feats = [spans[0][0], spans[0][1] - 1, spans[1][0]]
    feats += torch.randperm(len(n.features), generator=gen)[:3].tolist()
    sources = feats + [n.error_start + 1, n.error_start + n.n_pos + 2, n.token_start,
                       n.token_start + n.n_pos - 1]
    for s in sources:
        without = oracle.run(drop=[n.key(g.ids[s])])
        for t in g.target_rows.tolist():
            change = oracle.target(full, g, t) - oracle.target(without, g, t)
            assert close(float(g.adjacency[t, s]), change, model), (name, g.ids[s], g.ids[t])


@pytest.mark.parametrize("prompt", PROMPTS[:2])
def test_predicted_ablation_is_the_frozen_models_and_the_unfrozen_is_plain_hooks(setup,
                                                                                 prompt):
    name, model, clt = setup
    g = ii.attribution_graph(model, prompt, clt)
    oracle = CltOracle(model.module, ids_of(model, prompt), clt)
    base = oracle.run(linear=True)
    n = g.nodes
    row = g.adjacency[n.n_sources, :len(n.features)].abs()
    picks = row.topk(2).indices.tolist() + [0, len(n.features) // 2]   # 0: a layer-0 feature
    for i in picks:
        node = g.ids[i]
        r = g.intervene({node: 0})
        ablated = oracle.run(linear=True, drop=[n.key(node)])
        for k in range(len(n.logits)):
            out = n.n_sources + k
            frozen = oracle.target(ablated, g, out) - oracle.target(base, g, out)
            assert close(float(r.predicted[k]), frozen, model), (name, node)
            assert close(float(r.frozen[k]), frozen, model), (name, node)
        live, raw = _unfrozen_oracle(oracle, n.key(node))
        assert torch.allclose(r.after.double(), live.double(), rtol=1e-5, atol=1e-4), node
        for k, (good, bad) in enumerate(n.vectors):
            def node_value(x):
                return float(x[good] - (x.mean() if bad is None else x[bad]))
            change = node_value(raw) - node_value(oracle.unembedded)
            assert close(float(r.unfrozen[k]), change, model), (name, node)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_a_clt_without_cross_layer_decoders_is_the_per_layer_graph(demo, name):
    model = wrapped(name, demo)
    clt = random_clt(3, 32, seed=4, cross=0.0)
    for prompt in (PROMPTS[0], PROMPTS[2]):
        a = ii.attribution_graph(model, prompt, clt, batch_size=5)
        b = ii.attribution_graph(model, prompt, diagonal(clt))
        assert a.ids == b.ids
        torch.testing.assert_close(a.adjacency, b.adjacency, atol=1e-10, rtol=1e-9)
        torch.testing.assert_close(a.values, b.values, atol=1e-10, rtol=1e-9)
        torch.testing.assert_close(a.bias, b.bias, atol=1e-10, rtol=1e-9)
        edit = {a.ids[0]: 0, a.ids[len(a.nodes.features) // 2]: ("scale", 2.0)}
        ra, rb = a.intervene(edit), b.intervene(edit)
        torch.testing.assert_close(ra.frozen, rb.frozen, atol=1e-10, rtol=1e-9)
        torch.testing.assert_close(ra.after, rb.after, atol=1e-10, rtol=1e-9)
    # with its cross-layer decoders the same encoders give other edges (the test can tell)
    c = ii.attribution_graph(model, PROMPTS[2], random_clt(3, 32, seed=4))
    assert c.ids == b.ids
    assert float((c.adjacency - b.adjacency).abs().max()) > 1e-3


def test_jumprelu_clt_adds_up_and_matches_its_oracle(demo):
    model = wrapped("llama", demo)
    clt = random_clt(3, 32, seed=6, jump=True)
    g = ii.attribution_graph(model, PROMPTS[1], clt)
    oracle = CltOracle(model.module, ids_of(model, PROMPTS[1]), clt)
    pre = {i: oracle.pre(i, oracle.mlp_in[i]) for i in range(3)}
    # by hand: relu(pre) * (pre > threshold); the oracle's relu would keep more latents
    active = sum(int(((pre[i] > clt.threshold[i]) & (pre[i] > 0)).sum()) for i in range(3))
    assert len(g.nodes.features) == active < sum(int((pre[i] > 0).sum()) for i in range(3))
    assert g.exactness() < 1e-8
    for r, node in enumerate(g.target_rows.tolist()):
        layer, pos, latent, act = g.nodes.features[node] if node < active else (None,) * 4
        if layer is not None:
            assert close(float(g.values[r]), float(pre[layer][pos, latent]), model)
            assert close(act, float(pre[layer][pos, latent]), model)
