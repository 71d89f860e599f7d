"""Edge attribution (EAP, EAP-IG) and exact circuit runs, against independent plain-hooks
implementations written here: per-receiver gradients by the chain rule at the q/k/v
projection's output, single-edge patches at the norm's input or the projection's output, on
GPT-2, GPT-NeoX (parallel and sequential residual) and Llama (GQA) shapes."""

from __future__ import annotations


import pytest
import torch

import ipy_intervene as ii
from ipy_intervene.circuit import Circuit, edge_attribution, patch_edges, verify_circuit
from ipy_intervene.errors import InputError, SiteError
from transformers import (GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM,
                          LlamaConfig, LlamaForCausalLM)

from conftest import CORRUPT, PROMPT
from edges_oracle import get, hook_free, plain, pre_add, receivers, scores_by_hand

METRIC = ii.logit_diff("Mary", "John")
CLEAN = [PROMPT, "Then , Mary and John had a drink"]
CORRUPTED = [CORRUPT, "Then , John and Mary had a drink"]
ARCHS4 = ("gpt2", "neox", "neox-serial", "llama")

# (blocks, attn, attn norm, mlp norm, mlp, out projection, final norm)
LAYOUT = {
    "gpt2": ("transformer.h", "attn", "ln_1", "ln_2", "mlp", "c_proj", "transformer.ln_f"),
    "neox": ("gpt_neox.layers", "attention", "input_layernorm", "post_attention_layernorm",
             "mlp", "dense", "gpt_neox.final_layer_norm"),
    "llama": ("model.layers", "self_attn", "input_layernorm", "post_attention_layernorm",
              "mlp", "o_proj", "model.norm"),
}
LAYOUT["neox-serial"] = LAYOUT["neox"]


def build(arch, vocab, init=0.2):
    """A 3-layer, 32-wide random model, seeded; weights drawn with std ``init`` (not the
    default 0.02, which makes every edge's effect ~1e-6: below any useful tolerance)."""
    torch.manual_seed(0)
    special = dict(bos_token_id=0, eos_token_id=0, pad_token_id=1, initializer_range=init)
    if arch == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=64, n_embd=32,
                                          n_layer=3, n_head=4, **special)).eval()
    if arch.startswith("neox"):
        return GPTNeoXForCausalLM(GPTNeoXConfig(
            vocab_size=vocab, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=64,
            use_parallel_residual=arch == "neox", **special)).eval()
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
        **special)).eval()


@pytest.fixture(scope="module", params=ARCHS4)
def arch_model(request, demo):
    arch = request.param
    return arch, ii.wrap(build(arch, len(demo.tokenizer)), demo.tokenizer)


class Hand:
    """The model's parts as this test file reads them."""

    def __init__(self, arch, model):
        self.arch, self.model, self.root = arch, model, model.module
        blocks, self.attn, self.an, self.mn, self.mlp, self.op, final = LAYOUT[arch]
        self.blocks, self.final = get(self.root, blocks), get(self.root, final)
        cfg = self.root.config
        self.H = cfg.num_attention_heads
        self.KV = getattr(cfg, "num_key_value_heads", None) or self.H
        self.dh = cfg.hidden_size // self.H
        self.n = len(self.blocks)

    def part(self, layer, name):
        return get(self.blocks[layer], name)

    def proj(self, layer, t):
        """(projection module, its output columns for input t of head/kv head i)."""
        attn, d, H = self.part(layer, self.attn), self.dh, self.H
        if self.arch == "gpt2":
            off = "qkv".index(t) * H * d
            return attn.c_attn, lambda i: slice(off + i * d, off + (i + 1) * d)
        if self.arch.startswith("neox"):
            off = "qkv".index(t) * d
            return attn.query_key_value, lambda i: slice(3 * d * i + off, 3 * d * i + off + d)
        return getattr(attn, f"{t}_proj"), lambda i: slice(i * d, (i + 1) * d)

    def weight(self, module):
        return module.weight if isinstance(module, torch.nn.Linear) else module.weight.T

    def kwargs(self, texts):
        return self.model.prepare([texts]).kwargs

    def metric(self, logits):
        return METRIC.bind(self.model, logits.shape[0])(logits)


def writes(hand, texts, embed=None):
    """{sender name: write [B, P, D]} of one plain run (``embed``: block 0's input)."""
    out, handles = {}, []

    def first(x):
        x = x if embed is None else embed
        out["embed"] = x.detach()
        return x
    handles.append(pre_add(hand.blocks[0], first))
    for l in range(hand.n):
        def heads(z, l=l):
            w, d = hand.weight(hand.part(l, f"{hand.attn}.{hand.op}")), hand.dh
            for h in range(hand.H):
                out[f"L{l}H{h}"] = (z[..., h * d:(h + 1) * d] @ w[:, h * d:(h + 1) * d].T).detach()
            return z
        handles.append(pre_add(hand.part(l, f"{hand.attn}.{hand.op}"), heads))
        handles.append(hand.part(l, hand.mlp).register_forward_hook(
            lambda m, a, o, l=l: out.__setitem__(f"MLP{l}", o.detach())))
    with plain(*handles), torch.no_grad():
        hand.root(**hand.kwargs(texts))
    return out


def grads_by_hand(hand, texts, embed=None):
    """{receiver name: d sum(metric) / d its input} at one run, by the chain rule: the
    gradient at each projection's output (or at the norm's input), back through the norm."""
    leaves, resid, handles = {}, {}, []
    if embed is not None:
        handles.append(pre_add(hand.blocks[0], lambda x: embed))
    for l in range(hand.n):
        handles.append(pre_add(hand.part(l, hand.an),
                               lambda x, l=l: (resid.__setitem__(l, x.detach()), x)[1]))
        for t in "qkv":
            module, _ = hand.proj(l, t)
            if (l, id(module)) in leaves:
                continue
            leaf = leaves[(l, id(module))] = None

            def add(m, a, o, key=(l, id(module))):
                leaves[key] = torch.zeros_like(o, requires_grad=True)
                return o + leaves[key]
            handles.append(module.register_forward_hook(add))

        def mlp_in(x, l=l):
            leaves[f"MLP{l}"] = torch.zeros_like(x, requires_grad=True)
            return x + leaves[f"MLP{l}"]
        handles.append(pre_add(hand.part(l, hand.mn), mlp_in))

    def final_in(x):
        leaves["logits"] = torch.zeros_like(x, requires_grad=True)
        return x + leaves["logits"]
    handles.append(pre_add(hand.final, final_in))
    with plain(*handles), torch.enable_grad():
        value = hand.metric(hand.root(**hand.kwargs(texts)).logits).sum()
        keys = list(leaves)
        got = dict(zip(keys, torch.autograd.grad(value, [leaves[k] for k in keys],
                                                 allow_unused=True)))
    out = {}
    for name, kind, l, i in receivers(hand):
        if kind in ("mlp", "logits"):
            out[name] = got[name]
            continue
        module, cols = hand.proj(l, kind)
        g_out = got[(l, id(module))][..., cols(i)]
        x = resid[l].clone().requires_grad_(True)
        with torch.enable_grad():
            norm = hand.part(l, hand.an)
            y = norm(x) @ hand.weight(module)[cols(i)].T
            (out[name],) = torch.autograd.grad((y * g_out).sum(), x)
    return out


def expected_edges(hand, graph):
    """The edges as this file states the rule: a sender feeds what reads after it writes."""
    parallel = hand.arch == "neox"
    want = torch.zeros(len(graph.senders), len(graph.receivers), dtype=torch.bool)
    for s, send in enumerate(graph.senders):
        for r, recv in enumerate(graph.receivers):
            ls = -1 if send.name == "embed" else int(send.name.lstrip("MLP").split("H")[0]
                                                      .lstrip("L"))
            lr = hand.n if recv.name == "logits" else int(
                recv.name.split(".")[0].lstrip("MLP").split("H")[0].split("KV")[0].lstrip("L"))
            same = (ls == lr and send.name.startswith("L") and recv.name.startswith("MLP")
                    and not parallel)
            want[s, r] = ls < lr or same
    return want


def norm_inputs(hand, texts):
    """{receiver name: the residual stream it reads} in one plain run."""
    seen, handles = {}, []
    for name, kind, l, _ in receivers(hand):
        module = hand.final if kind == "logits" else hand.part(
            l, hand.mn if kind == "mlp" else hand.an)
        handles.append(pre_add(module, lambda x, n=name: (seen.__setitem__(n, x.detach()), x)[1]))
    with plain(*handles), torch.no_grad():
        hand.root(**hand.kwargs(texts))
    return seen


def test_eap_equals_its_closed_form(arch_model):
    arch, model = arch_model
    hand = Hand(arch, model)
    result = edge_attribution(model, CLEAN, CORRUPTED, METRIC)
    clean, corrupt = writes(hand, CLEAN), writes(hand, CORRUPTED)
    want = scores_by_hand(grads_by_hand(hand, CORRUPTED), clean, corrupt, result.graph)
    assert torch.equal(~result.scores.isnan(), expected_edges(hand, result.graph))
    assert torch.equal(want.isnan(), result.scores.isnan())
    assert float(want.nan_to_num().abs().max()) > 0.05      # far above the tolerance
    assert torch.allclose(result.scores.nan_to_num(), want.nan_to_num(), atol=1e-5, rtol=0)


def test_edges_into_a_receiver_add_up_to_its_input_change(arch_model):
    """Completeness: the senders upstream of v carry all of v's input change, so the scores
    into v sum to (clean input - corrupted input) . gradient."""
    arch, model = arch_model
    hand = Hand(arch, model)
    result = edge_attribution(model, CLEAN, CORRUPTED, METRIC)
    grads = grads_by_hand(hand, CORRUPTED)
    clean, corrupt = norm_inputs(hand, CLEAN), norm_inputs(hand, CORRUPTED)
    for r, recv in enumerate(result.graph.receivers):
        want = ((clean[recv.name] - corrupt[recv.name]) * grads[recv.name]).sum((1, 2)).mean()
        assert float(result.scores[:, r].nansum()) == pytest.approx(float(want), abs=1e-5)
    assert result.per_prompt.shape == (2, len(result.graph.senders), len(result.graph.receivers))
    assert hook_free(model.module)


def test_eap_ig_equals_its_closed_form(arch_model):
    arch, model = arch_model
    hand = Hand(arch, model)
    steps = 3
    result = edge_attribution(model, CLEAN, CORRUPTED, METRIC, method="eap-ig", steps=steps)
    clean, corrupt = writes(hand, CLEAN), writes(hand, CORRUPTED)
    grads = None
    for k in range(steps):
        point = corrupt["embed"] + k / steps * (clean["embed"] - corrupt["embed"])
        g = grads_by_hand(hand, CORRUPTED, embed=point)
        grads = g if grads is None else {n: grads[n] + g[n] for n in g}
    grads = {n: v / steps for n, v in grads.items()}
    want = scores_by_hand(grads, clean, corrupt, result.graph)
    eap = edge_attribution(model, CLEAN, CORRUPTED, METRIC).scores.nan_to_num()
    assert float((eap - want.nan_to_num()).abs().max()) > 1e-3   # the steps do matter
    assert torch.allclose(result.scores.nan_to_num(), want.nan_to_num(), atol=1e-5, rtol=0)


def test_eap_ig_with_one_step_is_eap(arch_model):
    _, model = arch_model
    eap = edge_attribution(model, CLEAN, CORRUPTED, METRIC)
    ig = edge_attribution(model, CLEAN, CORRUPTED, METRIC, method="eap-ig", steps=1)
    assert torch.equal(eap.per_prompt, ig.per_prompt)


def test_frozen_weights_give_the_same_scores(arch_model):
    _, model = arch_model
    want = edge_attribution(model, CLEAN, CORRUPTED, METRIC, method="eap-ig", steps=2)
    params = list(model.module.parameters())
    try:
        for p in params:
            p.requires_grad_(False)
        got = edge_attribution(model, CLEAN, CORRUPTED, METRIC, method="eap-ig", steps=2)
    finally:
        for p in params:
            p.requires_grad_(True)
    assert torch.allclose(got.per_prompt, want.per_prompt, atol=1e-6, rtol=0)
    assert all(p.grad is None for p in params)


def naive_edge(hand, base, source_writes, base_writes, sender, receiver):
    """The ``base`` run, plain hooks, receiver's input += source_u - base_u."""
    diff = source_writes[sender] - base_writes[sender]
    name, kind, l, i = next(r for r in receivers(hand) if r[0] == receiver)
    if kind == "mlp":
        handles = [pre_add(hand.part(l, hand.mn), lambda x: x + diff)]
    elif kind == "logits":
        handles = [pre_add(hand.final, lambda x: x + diff)]
    else:
        seen = {}
        module, cols = hand.proj(l, kind)

        def rewrite(m, a, o):
            o = o.clone()
            w = hand.weight(module)[cols(i)]
            b = module.bias[cols(i)] if module.bias is not None else 0
            o[..., cols(i)] = hand.part(l, hand.an)(seen["x"] + diff) @ w.T + b
            return o
        handles = [pre_add(hand.part(l, hand.an), lambda x: (seen.__setitem__("x", x), x)[1]),
                   module.register_forward_hook(rewrite)]
    with plain(*handles), torch.no_grad():
        return hand.metric(hand.root(**hand.kwargs(base)).logits)


def some_edges(graph):
    """A spread of edges: into every receiver kind, from every sender kind."""
    picked = []
    for role in ("q", "k", "v", "mlp", "logits"):
        edges = [(graph.senders[s].name, graph.receivers[r].name)
                 for s, r in graph.upstream.nonzero().tolist() if graph.receivers[r].role == role]
        picked += edges[::max(1, len(edges) // 7)]
    return picked


def test_single_edge_patch_equals_plain_hooks(arch_model):
    arch, model = arch_model
    hand = Hand(arch, model)
    clean, corrupt = writes(hand, CLEAN), writes(hand, CORRUPTED)
    graph = edge_attribution(model, CLEAN, CORRUPTED, METRIC).graph
    base = hand.metric(hand.root(**hand.kwargs(CORRUPTED)).logits).detach()
    kinds, effects = set(), []
    for sender, receiver in some_edges(graph):
        want = naive_edge(hand, CORRUPTED, clean, corrupt, sender, receiver)
        got = patch_edges(model, CORRUPTED, CLEAN, METRIC, [(sender, receiver)])
        assert torch.allclose(got, want, atol=1e-5, rtol=0), (sender, receiver, got, want)
        kinds.add(receiver.split(".")[-1][:3])
        effects.append(float((want - base).abs().max()))
    assert {"q", "k", "v", "MLP", "log"} <= kinds
    assert sorted(effects)[len(effects) // 2] > 1e-3   # most patches move the metric


def test_circuit_without_one_edge_equals_plain_hooks(arch_model):
    arch, model = arch_model
    hand = Hand(arch, model)
    clean, corrupt = writes(hand, CLEAN), writes(hand, CORRUPTED)
    result = edge_attribution(model, CLEAN, CORRUPTED, METRIC)
    graph = result.graph
    for sender, receiver in some_edges(graph)[::3]:
        c = Circuit.full(graph)
        c.mask[graph.sender_index(sender), graph.receiver_index(receiver)] = False
        got = verify_circuit(model, c, CLEAN, CORRUPTED, METRIC)
        want = naive_edge(hand, CLEAN, corrupt, clean, sender, receiver)
        assert got.circuit_metric == pytest.approx(float(want.mean()), abs=1e-5)
        assert torch.allclose(got.per_prompt, want, atol=1e-5)
        mean = {k: v.mean(0, keepdim=True).expand_as(v) for k, v in corrupt.items()}
        got = verify_circuit(model, c, CLEAN, CORRUPTED, METRIC, ablation="mean")
        want = naive_edge(hand, CLEAN, mean, clean, sender, receiver)
        assert torch.allclose(got.per_prompt, want, atol=1e-5)


def test_full_circuit_recovers_one_and_empty_zero(arch_model):
    _, model = arch_model
    result = edge_attribution(model, CLEAN, CORRUPTED, METRIC)
    full = result.circuit(top=result.graph.n_edges).verify()
    empty = Circuit.empty(result.graph).verify(model, CLEAN, CORRUPTED, METRIC)
    assert full.circuit_metric == pytest.approx(result.clean_metric, abs=1e-5)
    assert empty.circuit_metric == pytest.approx(result.corrupted_metric, abs=1e-5)
    assert abs(result.clean_metric - result.corrupted_metric) > 0.05
    assert full.recovered == pytest.approx(1.0, abs=1e-5)
    assert empty.recovered == pytest.approx(0.0, abs=1e-5)
    assert hook_free(model.module)


def test_full_and_empty_circuit_on_the_demo_model(demo):
    clean, corrupt = [PROMPT, CORRUPT], [CORRUPT, PROMPT]
    metric = ii.logit_diff(["Mary", "John"], ["John", "Mary"])
    result = edge_attribution(demo, clean, corrupt, metric)
    full = Circuit.full(result.graph).verify(demo, clean, corrupt, metric)
    empty = Circuit.empty(result.graph).verify(demo, clean, corrupt, metric)
    assert result.clean_metric - result.corrupted_metric > 10
    assert full.recovered == pytest.approx(1.0, abs=1e-5)
    assert empty.recovered == pytest.approx(0.0, abs=1e-5)
    assert full.circuit_metric == pytest.approx(full.clean_metric, abs=1e-5)
    assert empty.circuit_metric == pytest.approx(empty.corrupted_metric, abs=1e-5)
    half = result.circuit(top=40).verify(ablation="mean")
    assert half.ablation == "mean" and half.n_edges == 40


def test_parallel_residual_edges(demo):
    vocab = len(demo.tokenizer)
    par = ii.circuit.build_graph(build("neox", vocab))
    seq = ii.circuit.build_graph(build("neox-serial", vocab))
    gpt = ii.circuit.build_graph(build("gpt2", vocab))
    for g, same_layer in ((par, False), (seq, True), (gpt, True)):
        assert bool(g.upstream[g.sender_index("L1H2"), g.receiver_index("MLP1")]) is same_layer
        assert bool(g.upstream[g.sender_index("L1H2"), g.receiver_index("MLP2")])
        assert not g.upstream[g.sender_index("L1H2"), g.receiver_index("L1H0.q")]
        assert not g.upstream[g.sender_index("MLP1"), g.receiver_index("MLP1")]


def test_gqa_keys_and_values_are_per_kv_head(demo):
    g = ii.circuit.build_graph(build("llama", len(demo.tokenizer)))
    names = [r.name for r in g.receivers[:g.per_layer]]
    assert names == ["L0H0.q", "L0H1.q", "L0H2.q", "L0H3.q", "L0KV0.k", "L0KV1.k",
                     "L0KV0.v", "L0KV1.v"]


def test_circuit_top_threshold_and_nodes(demo):
    r = edge_attribution(demo, PROMPT, CORRUPT, METRIC)
    top = r.circuit(top=5)
    assert len(top) == 5 and [e[:2] for e in top.edges] == [e[:2] for e in r.edges(5)]
    cut = abs(r.edges(5)[-1][2])
    assert len(r.circuit(threshold=cut)) == 5
    assert set(top.nodes) >= {top.edges[0][0], top.edges[0][1].split(".")[0]}
    assert r.score(*r.edges(1)[0][:2]) == r.edges(1)[0][2]


@pytest.mark.parametrize("call, words", [
    (lambda m: edge_attribution(m, PROMPT, CORRUPT, METRIC, method="acdc"), "method"),
    (lambda m: edge_attribution(m, PROMPT, CORRUPT, METRIC, method="eap-ig", steps=0), "steps"),
    (lambda m: edge_attribution(m, PROMPT, CORRUPT, METRIC, method="eap-ig", steps=2.5),
     "steps"),
    (lambda m: edge_attribution(m, PROMPT, CORRUPT, METRIC).circuit(top=0), "top"),
    (lambda m: edge_attribution(m, PROMPT, CORRUPT, METRIC).circuit(top=10 ** 6), "top"),
    (lambda m: edge_attribution(m, PROMPT, CORRUPT, METRIC).circuit(), "exactly one"),
    (lambda m: edge_attribution(m, PROMPT, CORRUPT, METRIC).circuit(threshold=-1), "threshold"),
    (lambda m: edge_attribution(m, PROMPT, CORRUPT, METRIC).circuit(top=3).verify(
        ablation="zero"), "ablation"),
    (lambda m: edge_attribution(m, PROMPT, CORRUPT, lambda l: l[:, -1, 0].detach()),
     "gradient"),
    (lambda m: edge_attribution(m, PROMPT, "Then , Mary and John had", METRIC), "length"),
    (lambda m: Circuit.from_edges(ii.circuit.build_graph(m), [("MLP2", "L1H0.q")]),
     "not an edge"),
    (lambda m: Circuit.from_edges(ii.circuit.build_graph(m), [("L9H0", "logits")]),
     "unknown sender"),
])
def test_bad_input_is_a_clear_error(demo, call, words):
    with pytest.raises(InputError, match=words):
        call(demo)
    assert hook_free(demo.module)


def failing_on_call(n):
    """A forward hook that raises on its n-th call (so inside the n-th forward)."""
    calls = []

    def boom(m, a, o):
        calls.append(1)
        if len(calls) == n:
            raise RuntimeError("boom")
    return boom


def test_no_hook_left_after_a_failure_mid_forward(arch_model):
    """The failure lands inside the gradient run / the circuit run, while the q/k/v
    projections are replaced and every receiver is hooked."""
    _, model = arch_model
    hand = Hand(*arch_model)
    graph = ii.circuit.build_graph(model)
    calls = [(2, lambda: edge_attribution(model, CLEAN, CORRUPTED, METRIC)),
             (3, lambda: edge_attribution(model, CLEAN, CORRUPTED, METRIC, method="eap-ig",
                                          steps=3)),
             (3, lambda: verify_circuit(model, Circuit.empty(graph), CLEAN, CORRUPTED, METRIC)),
             (2, lambda: patch_edges(model, CLEAN, CORRUPTED, METRIC, [("embed", "logits")]))]
    for n, call in calls:
        handle = hand.part(1, hand.mlp).register_forward_hook(failing_on_call(n))
        try:
            with pytest.raises(RuntimeError, match="boom"):
                call()
        finally:
            handle.remove()
        assert hook_free(model.module)

    def bad_metric(logits):
        raise ValueError("metric broke")
    with pytest.raises(ValueError, match="metric broke"):
        edge_attribution(model, CLEAN, CORRUPTED, bad_metric)
    assert hook_free(model.module)
    after = edge_attribution(model, CLEAN, CORRUPTED, METRIC)   # still the same numbers
    assert torch.equal(after.per_prompt, edge_attribution(model, CLEAN, CORRUPTED,
                                                          METRIC).per_prompt)


def test_wrong_model_is_a_clear_error(demo):
    with pytest.raises(SiteError, match="the architecture 'Linear' is not in the family table"):
        edge_attribution(ii.wrap(torch.nn.Linear(2, 2).eval()), PROMPT, CORRUPT, METRIC)
    other = ii.wrap(build("llama", len(demo.tokenizer)), demo.tokenizer)
    circuit = Circuit.empty(ii.circuit.build_graph(other))
    with pytest.raises(InputError, match="built for another model"):
        verify_circuit(demo, circuit, PROMPT, CORRUPT, METRIC)
    assert hook_free(demo.module)


def test_view_is_offline_svg(demo):
    r = edge_attribution(demo, PROMPT, CORRUPT, METRIC)
    bundle = r.circuit(top=12)._repr_mimebundle_()
    assert set(bundle) >= {"text/plain", "text/html"}
    svg = bundle.get("image/svg+xml")
    if svg is not None:
        assert svg.startswith("<svg") and "http" not in svg.replace(
            "http://www.w3.org", "").replace("xlink", "")
        assert r.edges(1)[0][0] in svg
    assert "EdgeResult" in r._repr_mimebundle_()["text/plain"]
