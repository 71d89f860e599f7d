"""Edge attribution and exact circuit runs on families the circuit graph reads from the
architecture layer (``arch/``): GPT-J (parallel residual, attention and MLP through one norm,
q/k/v without bias), Phi-3 (one fused ``qkv_proj``, GQA), Qwen3-MoE (QK-norm, GQA, sparse
MoE MLP) and parallel StableLM (one shared norm, GQA). Each is checked against plain-hooks
computations written here, with each family's q/k/v columns stated from transformers'
modeling files; a hand-made ``ii.Adapter`` equal to the table's gives the same graph and
scores; maps that lack or misstate the q/k/v facts are refused."""

from __future__ import annotations

from dataclasses import fields

import pytest
import torch

import ipy_intervene as ii
from ipy_intervene.arch.sites import adapter_for
from ipy_intervene.circuit import (Circuit, build_graph, edge_attribution, patch_edges,
                                   verify_circuit)
from ipy_intervene.errors import InputError, SiteError

from conftest import CORRUPT, PROMPT, tiny_family
from edges_oracle import get, hook_free, plain, pre_add, receivers, scores_by_hand

METRIC = ii.logit_diff("Mary", "John")
CLEAN = [PROMPT, "Then , Mary and John had a drink"]
CORRUPTED = [CORRUPT, "Then , John and Mary had a drink"]
SHAPE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=64, max_position_embeddings=64, bos_token_id=0, eos_token_id=0,
             pad_token_id=1, initializer_range=0.2)
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
LLAMA = dict(blocks="model.layers", attn="self_attn", an="input_layernorm",
             mn="post_attention_layernorm", mlp="mlp", op="o_proj", final="model.norm",
             qkv="separate", kv=2, parallel=False)
# family -> (config extras, how this file reads the model)
FAMS = {
    "gptj": (dict(rotary_dim=4), dict(blocks="transformer.h", attn="attn", an="ln_1", mn="ln_1",
                                      mlp="mlp", op="out_proj", final="transformer.ln_f",
                                      qkv="separate", kv=4, parallel=True)),
    "phi3": ({}, {**LLAMA, "qkv": "qkv_proj"}),
    "qwen3_moe": (MOE, LLAMA),
    "stablelm-parallel": (dict(use_parallel_residual=True),
                          {**LLAMA, "mn": "input_layernorm", "parallel": True}),
}


def build(name, vocab):
    return tiny_family(name.split("-")[0], vocab, **{**SHAPE, **FAMS[name][0]})


@pytest.fixture(scope="module", params=list(FAMS))
def fam(request, demo):
    name = request.param
    return name, ii.wrap(build(name, len(demo.tokenizer)), demo.tokenizer)


class Hand:
    """The model's parts as this file reads them."""

    def __init__(self, name, model):
        self.model, self.root = model, model.module
        spec = FAMS[name][1]
        self.spec = spec
        self.blocks, self.final = get(self.root, spec["blocks"]), get(self.root, spec["final"])
        self.H, self.KV, self.dh = 4, spec["kv"], 8
        self.n = len(self.blocks)

    def part(self, layer, key):
        return get(self.blocks[layer], self.spec[key] if key in self.spec else key)

    def proj(self, layer, t):
        """(projection, its output columns for input t of head / kv head i)."""
        attn, d, H, KV = self.part(layer, "attn"), self.dh, self.H, self.KV
        if self.spec["qkv"] == "qkv_proj":    # Phi3Attention.forward: slices at H*d, H*d+KV*d
            off = {"q": 0, "k": H * d, "v": H * d + KV * d}[t]
            return attn.qkv_proj, lambda i: slice(off + i * d, off + (i + 1) * d)
        return getattr(attn, f"{t}_proj"), lambda i: slice(i * d, (i + 1) * d)

    def kwargs(self, texts):
        return self.model.prepare([texts]).kwargs

    def metric(self, logits):
        return METRIC.bind(self.model, logits.shape[0])(logits)


def first(out):
    return out[0] if isinstance(out, tuple) else out


def mlp_reads(hand, l, make):
    """Hooks making the MLP of layer l read ``mn(make(x))``, x: the residual at mn's input
    (the MLP's own input, even where mn is attention's norm too)."""
    seen = {}
    return [pre_add(hand.part(l, "mn"), lambda x: (seen.__setitem__("x", x), x)[1]),
            pre_add(hand.part(l, "mlp"), lambda x: hand.part(l, "mn")(make(seen["x"])))]


def writes(hand, texts, embed=None):
    out, handles = {}, []

    def block0(x):
        x = x if embed is None else embed
        out["embed"] = x.detach()
        return x
    handles.append(pre_add(hand.blocks[0], block0))
    for l in range(hand.n):
        def heads(z, l=l):
            w, d = hand.part(l, f"{hand.spec['attn']}.{hand.spec['op']}").weight, hand.dh
            for h in range(hand.H):
                out[f"L{l}H{h}"] = (z[..., h * d:(h + 1) * d] @ w[:, h * d:(h + 1) * d].T).detach()
            return z
        handles.append(pre_add(hand.part(l, f"{hand.spec['attn']}.{hand.spec['op']}"), heads))
        handles.append(hand.part(l, "mlp").register_forward_hook(
            lambda m, a, o, l=l: out.__setitem__(f"MLP{l}", first(o).detach())))
    with plain(*handles), torch.no_grad():
        hand.root(**hand.kwargs(texts))
    return out


def grads_by_hand(hand, texts, embed=None):
    """{receiver: d sum(metric) / d its input}: a zero leaf added where only that receiver
    reads (the projection's output, then back through the norm; the MLP's own normed input;
    the final norm's input)."""
    leaves, resid, handles = {}, {}, []
    if embed is not None:
        handles.append(pre_add(hand.blocks[0], lambda x: embed))
    for l in range(hand.n):
        handles.append(pre_add(hand.part(l, "an"),
                               lambda x, l=l: (resid.__setitem__(l, x.detach()), x)[1]))
        for t in "qkv":
            module, _ = hand.proj(l, t)
            if (l, id(module)) in leaves:
                continue
            leaves[(l, id(module))] = None

            def add(m, a, o, key=(l, id(module))):
                leaves[key] = torch.zeros_like(o, requires_grad=True)
                return o + leaves[key]
            handles.append(module.register_forward_hook(add))

        def mlp_in(x, l=l):
            leaves[f"MLP{l}"] = torch.zeros_like(x, requires_grad=True)
            return x + leaves[f"MLP{l}"]
        handles += mlp_reads(hand, l, mlp_in)

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
            y = hand.part(l, "an")(x) @ module.weight[cols(i)].T
            (out[name],) = torch.autograd.grad((y * g_out).sum(), x)
    return out


def expected_edges(hand, graph):
    def layer(name):
        if name in ("embed", "logits"):
            return -1 if name == "embed" else hand.n
        return int(name.split(".")[0].lstrip("MLP").split("H")[0].split("KV")[0].lstrip("L"))
    want = torch.zeros(len(graph.senders), len(graph.receivers), dtype=torch.bool)
    for s, send in enumerate(graph.senders):
        for r, recv in enumerate(graph.receivers):
            ls, lr = layer(send.name), layer(recv.name)
            same = (ls == lr and send.name.startswith("L") and recv.name.startswith("MLP")
                    and not hand.spec["parallel"])
            want[s, r] = ls < lr or same
    return want


def naive_edge(hand, base, source_writes, base_writes, sender, receiver):
    """The ``base`` run, plain hooks, the receiver's input += source_u - base_u."""
    diff = source_writes[sender] - base_writes[sender]
    _, kind, l, i = next(r for r in receivers(hand) if r[0] == receiver)
    if kind == "mlp":
        handles = mlp_reads(hand, l, lambda x: x + diff)
    elif kind == "logits":
        handles = [pre_add(hand.final, lambda x: x + diff)]
    else:
        seen = {}
        module, cols = hand.proj(l, kind)

        def rewrite(m, a, o):
            o = o.clone()
            b = module.bias[cols(i)] if module.bias is not None else 0
            o[..., cols(i)] = hand.part(l, "an")(seen["x"] + diff) @ module.weight[cols(i)].T + b
            return o
        handles = [pre_add(hand.part(l, "an"), lambda x: (seen.__setitem__("x", x), x)[1]),
                   module.register_forward_hook(rewrite)]
    with plain(*handles), torch.no_grad():
        return hand.metric(hand.root(**hand.kwargs(base)).logits)


def some_edges(graph, every=5):
    picked = []
    for role in ("q", "k", "v", "mlp", "logits"):
        edges = [(graph.senders[s].name, graph.receivers[r].name)
                 for s, r in graph.upstream.nonzero().tolist() if graph.receivers[r].role == role]
        picked += edges[::max(1, len(edges) // every)]
    return picked


def test_eap_and_eap_ig_equal_their_closed_form(fam):
    name, model = fam
    hand = Hand(name, model)
    result = edge_attribution(model, CLEAN, CORRUPTED, METRIC)
    graph = result.graph
    assert (graph.n_kv, graph.parallel) == (hand.KV, hand.spec["parallel"])
    clean, corrupt = writes(hand, CLEAN), writes(hand, CORRUPTED)
    want = scores_by_hand(grads_by_hand(hand, CORRUPTED), clean, corrupt, graph)
    assert torch.equal(~result.scores.isnan(), expected_edges(hand, graph))
    assert torch.equal(want.isnan(), result.scores.isnan())
    assert float(want.nan_to_num().abs().max()) > 0.05
    assert torch.allclose(result.scores.nan_to_num(), want.nan_to_num(), atol=1e-5, rtol=0)
    steps = 2
    ig = edge_attribution(model, CLEAN, CORRUPTED, METRIC, method="eap-ig", steps=steps)
    grads = None
    for k in range(steps):
        point = corrupt["embed"] + k / steps * (clean["embed"] - corrupt["embed"])
        g = grads_by_hand(hand, CORRUPTED, embed=point)
        grads = g if grads is None else {n: grads[n] + g[n] for n in g}
    want = scores_by_hand({n: v / steps for n, v in grads.items()}, clean, corrupt, graph)
    assert torch.allclose(ig.scores.nan_to_num(), want.nan_to_num(), atol=1e-5, rtol=0)
    assert hook_free(model.module)


def test_single_edge_patches_and_circuits_equal_plain_hooks(fam):
    name, model = fam
    hand = Hand(name, model)
    clean, corrupt = writes(hand, CLEAN), writes(hand, CORRUPTED)
    result = edge_attribution(model, CLEAN, CORRUPTED, METRIC)
    graph = result.graph
    base = hand.metric(hand.root(**hand.kwargs(CORRUPTED)).logits).detach()
    kinds, effects = set(), []
    for sender, receiver in some_edges(graph):
        want = naive_edge(hand, CORRUPTED, clean, corrupt, sender, receiver)
        got = patch_edges(model, CORRUPTED, CLEAN, METRIC, [(sender, receiver)])
        assert torch.allclose(got, want, atol=1e-5, rtol=0), (sender, receiver, got, want)
        kinds.add(receiver.split(".")[-1][:3])
        effects.append(float((want - base).abs().max()))
    assert {"q", "k", "v", "MLP", "log"} <= kinds
    assert sorted(effects)[len(effects) // 2] > 1e-3
    for sender, receiver in some_edges(graph, every=2)[::2]:
        c = Circuit.full(graph)
        c.mask[graph.sender_index(sender), graph.receiver_index(receiver)] = False
        got = verify_circuit(model, c, CLEAN, CORRUPTED, METRIC)
        want = naive_edge(hand, CLEAN, corrupt, clean, sender, receiver)
        assert torch.allclose(got.per_prompt, want, atol=1e-5), (sender, receiver)
    full = result.circuit(top=graph.n_edges).verify()
    empty = Circuit.empty(graph).verify(model, CLEAN, CORRUPTED, METRIC)
    assert abs(result.clean_metric - result.corrupted_metric) > 1e-3
    assert full.circuit_metric == pytest.approx(result.clean_metric, abs=1e-5)
    assert empty.circuit_metric == pytest.approx(result.corrupted_metric, abs=1e-5)
    assert hook_free(model.module)


def by_hand(adapter, **change):
    """``ii.Adapter(...)`` with the table map's fields, written out by hand."""
    values = {f.name: getattr(adapter, f.name) for f in fields(adapter)
              if f.name not in ("name", "n_layers")}
    return ii.Adapter(change.pop("name", adapter.name), **{**values, **change})


def test_a_hand_adapter_equal_to_the_table_gives_the_same_graph_and_scores(fam):
    name, model = fam
    table = adapter_for(model)
    want = edge_attribution(model, CLEAN, CORRUPTED, METRIC)
    for hand in (by_hand(table), by_hand(table, name="mine")):
        got = edge_attribution(model, CLEAN, CORRUPTED, METRIC, adapter=hand)
        g, w = got.graph, want.graph
        assert [n.name for n in g.senders] == [n.name for n in w.senders]
        assert [n.name for n in g.receivers] == [n.name for n in w.receivers]
        assert torch.equal(g.upstream, w.upstream) and g.slots == w.slots
        assert (g.n_heads, g.n_kv, g.head_dim, g.parallel) == (w.n_heads, w.n_kv, w.head_dim,
                                                               w.parallel)
        assert torch.equal(got.per_prompt, want.per_prompt)
        assert got.circuit(top=10).verify().circuit_metric == pytest.approx(
            want.circuit(top=10).verify().circuit_metric, abs=1e-6)
    mine = by_hand(table, name="mine")
    edge = some_edges(want.graph)[0]
    assert torch.equal(patch_edges(model, CORRUPTED, CLEAN, METRIC, [edge], adapter=mine),
                       patch_edges(model, CORRUPTED, CLEAN, METRIC, [edge]))


def test_maps_without_exact_qkv_facts_are_refused(demo):
    model = ii.wrap(build("phi3", len(demo.tokenizer)), demo.tokenizer)
    table = adapter_for(model)
    assert table.qkv == ("self_attn.qkv_proj",) and table.qkv_layout == "blocks"
    with pytest.raises(SiteError, match=r"for the 'mine' map.*missing: attn_norm, qkv"):
        build_graph(model, by_hand(table, name="mine", attn_norm=None, qkv=None,
                                   qkv_layout=None))
    with pytest.raises(SiteError, match=r"'phi3' q/k/v projection widths \[64\] do not fit "
                                        r"qkv_layout='per_head'"):
        build_graph(model, by_hand(table, qkv_layout="per_head"))
    with pytest.raises(SiteError, match="does not say how the q/k/v columns split"):
        build_graph(model, by_hand(table, qkv_layout=None))
    with pytest.raises(SiteError, match=r"qkv\[0\]='self_attn.nothing' is not a module"):
        build_graph(model, by_hand(table, qkv=("self_attn.nothing",)))
    with pytest.raises(SiteError, match="missing: mlp_norm"):     # parallel: say the MLP's norm
        gptj = ii.wrap(build("gptj", len(demo.tokenizer)), demo.tokenizer)
        build_graph(gptj, by_hand(adapter_for(gptj), mlp_norm=None))
    assert hook_free(model.module)


def test_a_family_outside_the_table_says_what_its_map_lacks_and_a_failing_hand_map_too(demo):
    module = build("phi3", len(demo.tokenizer))
    module.config.model_type = "unknown_family"
    model = ii.wrap(module, demo.tokenizer)        # discovered, but without q/k/v paths
    with pytest.raises(SiteError, match="edge attribution needs, for the 'unknown_family' map, "
                                        "how attention and the MLP read the residual stream; "
                                        "missing: qkv"):
        edge_attribution(model, PROMPT, CORRUPT, METRIC)
    table = adapter_for(ii.wrap(build("phi3", len(demo.tokenizer)), demo.tokenizer))
    assert build_graph(model, by_hand(table, name="mine")).n_kv == 2
    with pytest.raises(SiteError, match="fails its check"):
        build_graph(model, by_hand(table, name="wrong", mlp="self_attn"))


def test_a_hand_map_naming_the_wrong_norm_is_refused(demo):
    model = ii.wrap(build("gptj", len(demo.tokenizer)), demo.tokenizer)
    table = adapter_for(model)
    wrong = by_hand(table, name="mine", mlp_norm="mlp.fc_in")
    with pytest.raises(SiteError, match=r"'mine' map says mlp reads mlp_norm='mlp.fc_in', but "
                                        r"in layer 0 its input is not that norm's output"):
        edge_attribution(model, PROMPT, CORRUPT, METRIC, adapter=wrong)
    assert hook_free(model.module)


def test_a_wrong_fused_qkv_layout_is_refused_on_the_model_forward(demo):
    """The stated q/k/v split is proven on a forward: NeoX's fused projection is each head's
    [q | k | v]; declared as [q heads | k heads | v heads] its v columns are not the values
    the attention reads, and edge attribution refuses the map instead of scoring it."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    model = ii.wrap(GPTNeoXForCausalLM(GPTNeoXConfig(
        vocab_size=len(demo.tokenizer), hidden_size=32, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=64)).eval(), demo.tokenizer)
    build_graph(model)                                    # the table's split: proven
    wrong = by_hand(adapter_for(model), name="mine", qkv_layout="blocks")
    with pytest.raises(SiteError, match=r"'mine' map's qkv=.*qkv_layout='blocks' does not "
                                        r"give the model's values: kv head 0"):
        build_graph(model, adapter=wrong)
    assert hook_free(model.module)
