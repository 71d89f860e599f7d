"""The attribution graph, checked exactly against the frozen replacement model written by
hand with plain PyTorch hooks (no ipy_intervene code in the oracle), on GPT-2-, Llama-,
Gemma-2- and Granite-shaped random models with random ReLU transcoders and on the demo model, for prompts
of several lengths:

(a) every target's input (pre-activation, logit) = its bias + the sum of its incoming edges;
(b) every edge = the change of its target's input when its source alone is removed;
(c) the graph's predicted effect of ablating a feature = the frozen model's, and the
    unfrozen model's effect (reported beside it) = a plain-hooks run of that model.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

import ipy_intervene as ii
from ipy_intervene.features.sae import SAE
from tests.conftest import tiny_model

TOL = 2e-4  # float32 (the demo model); the random models run in float64, to 1e-9


def close(a: float, b: float, model) -> bool:
    """Equal to float rounding: 1e-9 relative in float64, 2e-5 relative (+1e-4) in float32."""
    wide = next(model.module.parameters()).dtype == torch.float64
    rel, floor = (1e-9, 1e-9) if wide else (2e-5, 1e-4)
    return abs(a - b) <= floor + rel * max(abs(a), abs(b))
PROMPTS = ["When Mary and John went to the store , John gave a drink to",
           "The Thuzor Quenosk Fountain is in the city of",
           "Mary gave a drink to"]
ORACLE_KEY = "oracle_frozen_attention"
_PATTERNS: dict = {}


# -- the oracle: the frozen replacement model by hand ----------------------------------------

def _frozen_attention(module, query, key, value, attention_mask, **kwargs):
    """Attention whose pattern is the one recorded for this layer (plain eager arithmetic)."""
    pattern = _PATTERNS[module.layer_idx]
    repeat = pattern.shape[1] // value.shape[1]
    value = value.repeat_interleave(repeat, dim=1)
    return torch.matmul(pattern, value).transpose(1, 2).contiguous(), pattern


def parts(hf):
    """(blocks, [(norm, kind)], MLP modules (input read at the first, output replaced at the
    second), lm_head) by family, by hand. Kinds: ln (LayerNorm), rms (x * s * w), rms1
    (Gemma: x * s * (1 + w)). Gemma 2's post-MLP norm is inside what a transcoder replaces."""
    if hasattr(hf, "transformer"):
        blocks = list(hf.transformer.h)
        norms = [(b.ln_1, "ln") for b in blocks] + [(b.ln_2, "ln") for b in blocks] + \
            [(hf.transformer.ln_f, "ln")]
        return blocks, norms, [(b.mlp, b.mlp) for b in blocks], hf.lm_head
    blocks = list(hf.model.layers)
    if hf.config.model_type == "gemma2":
        norms = [(getattr(b, n), "rms1") for b in blocks for n in
                 ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm")]
        norms.append((hf.model.norm, "rms1"))
        return blocks, norms, [(b.mlp, b.post_feedforward_layernorm) for b in blocks], \
            hf.lm_head
    norms = [(b.input_layernorm, "rms") for b in blocks] + \
        [(b.post_attention_layernorm, "rms") for b in blocks] + [(hf.model.norm, "rms")]
    return blocks, norms, [(b.mlp, b.mlp) for b in blocks], hf.lm_head


class Oracle:
    """Records one prompt's forward (eager attention patterns, norm inputs, MLP inputs and
    outputs, block 0's input), then runs the frozen replacement model with hooks."""

    def __init__(self, hf, ids: torch.Tensor, tcs: dict) -> None:
        self.hf, self.ids, self.tcs = hf, ids, tcs
        self.blocks, self.norms, self.mlps, self.head = parts(hf)
        seen: dict = {}
        handles = [n.register_forward_hook(lambda m, a, o, n=n: seen.__setitem__(n, a[0]))
                   for n, _ in self.norms]
        for i, (inner, outer) in enumerate(self.mlps):
            handles.append(inner.register_forward_hook(
                lambda m, a, o, i=i: seen.__setitem__(("in", i), a[0])))
            handles.append(outer.register_forward_hook(
                lambda m, a, o, i=i: seen.__setitem__(("out", i), o)))
        handles.append(self.head.register_forward_hook(
            lambda m, a, o: seen.__setitem__("head", o[0, -1])))
        handles.append(self.blocks[0].register_forward_pre_hook(
            lambda m, a, k: seen.__setitem__("emb", (a[0] if a else k["hidden_states"])),
            with_kwargs=True))
        impl = hf.config._attn_implementation
        hf.set_attn_implementation("eager")
        try:
            with torch.no_grad():
                out = hf(input_ids=ids, output_attentions=True)
        finally:
            hf.set_attn_implementation(impl)
            for h in handles:
                h.remove()
        self.patterns = [a.detach() for a in out.attentions]
        self.logits = out.logits[0, -1]              # the model's (after any soft-cap)
        self.scale = logit_scale(hf)
        self.unembedded = seen["head"].detach() * self.scale  # the logits before any cap
        self.scales = {}
        for norm, kind in self.norms:
            x = seen[norm].double()
            if kind == "ln":
                x = x - x.mean(-1, keepdim=True)
            self.scales[norm] = (x.pow(2).mean(-1, keepdim=True) + _eps(norm)).rsqrt()
        self.mlp_in = [seen[("in", i)][0].detach() for i in range(len(self.mlps))]
        self.mlp_out = [seen[("out", i)][0].detach() for i in range(len(self.mlps))]
        self.emb = seen["emb"][0].detach()
        # the features read the MLP inputs of the frozen model at the prompt (each MLP
        # giving its recorded output): the model's own up to its norms' float rounding
        self.acts, self.errors = {}, {}
        self.mlp_in = [pre * 0 for pre in self.mlp_in]
        frozen_in = self.run(outputs=self.mlp_out)[2]
        for i in range(len(self.mlps)):
            self.mlp_in[i] = frozen_in[i]
            self.acts[i] = torch.relu(self.pre(i, frozen_in[i])).detach()
        for i in range(len(self.mlps)):
            self.errors[i] = self.mlp_out[i] - self.decode(i, self.acts).detach()

    def pre(self, layer, x):
        """Layer ``layer``'s pre-activations of ``x`` (per-layer transcoders, by hand)."""
        tc = self.tcs[layer]
        return x @ tc.W_enc + tc.b_enc

    def decode(self, layer, acts):
        """MLP ``layer``'s replacement output from the activations by layer, by hand."""
        tc = self.tcs[layer]
        return acts[layer] @ tc.W_dec + tc.b_dec

    @torch.no_grad()
    def run(self, acts=None, linear: bool = False, drop=(), frozen: bool = True,
            outputs=None):
        """Pre-activations ``[T, d_sae]`` per layer and last-position logits of the frozen
        model. ``acts``: features' activations (default: recorded); ``linear``: each active
        feature equals its pre-activation; ``drop``: ("f", l, p, latent) set to 0,
        ("e", l, p) and ("t", p) removed. ``frozen=False``: attention and norms live."""
        acts = self.acts if acts is None else acts
        pre: dict = {}
        inputs: dict = {}
        current: dict = {}      # this run's activations, layer by layer
        handles = []
        if frozen:
            for norm, kind in self.norms:
                handles.append(norm.register_forward_hook(self._norm_hook(kind)))
        for i, (inner, outer) in enumerate(self.mlps):
            box: list = []
            handles.append(inner.register_forward_hook(lambda m, a, o, box=box: box.append(a[0])))
            handles.append(outer.register_forward_hook(self._mlp_hook(i, acts, linear, drop,
                                                                      pre, inputs, outputs,
                                                                      box, current)))
        seen_logits: list = []
        handles.append(self.head.register_forward_hook(lambda m, a, o: seen_logits.append(o)))
        handles.append(self.blocks[0].register_forward_pre_hook(self._emb_hook(drop),
                                                                with_kwargs=True))
        impl = self.hf.config._attn_implementation
        if frozen:
            _PATTERNS.clear()
            _PATTERNS.update(enumerate(self.patterns))
            AttentionInterface.register(ORACLE_KEY, _frozen_attention)
            AttentionMaskInterface.register(ORACLE_KEY, eager_mask)
            for m in self.hf.modules():
                if hasattr(m, "config"):
                    m.config._attn_implementation = ORACLE_KEY
        try:
            self.hf(input_ids=self.ids)
            logits = seen_logits[0][0, -1] * self.scale  # before any soft-cap
        finally:
            for m in self.hf.modules():
                if hasattr(m, "config"):
                    m.config._attn_implementation = impl
            for h in handles:
                h.remove()
        return pre, logits, inputs

    def _norm_hook(self, kind):
        def hook(norm, args, output):
            x = args[0].double()
            if kind == "ln":
                x = x - x.mean(-1, keepdim=True)
            w = norm.weight.double()
            y = x * self.scales[norm] * (1 + w if kind == "rms1" else w)
            if kind == "ln":
                y = y + norm.bias.double()
            return y.to(output.dtype)
        return hook

    def _mlp_hook(self, layer, acts, linear, drop, pre, inputs, outputs, box, current):
        def hook(mlp, args, output):
            x = box.pop()[0]
            inputs[layer] = x.detach().clone()
            if outputs is not None:
                return outputs[layer][None]
            p = self.pre(layer, x)
            pre[layer] = p
            a = p * (self.acts[layer] != 0) if linear else acts[layer].clone()
            err = self.errors[layer].clone()
            for d in drop:
                if d[0] == "f" and d[1] == layer:
                    a[d[2], d[3]] = 0
                if d[0] == "e" and d[1] == layer:
                    err[d[2]] = 0
            current[layer] = a
            return (self.decode(layer, current) + err)[None]
        return hook

    def _emb_hook(self, drop):
        def hook(block, args, kwargs):
            x = self.emb.clone()
            for d in drop:
                if d[0] == "t":
                    x[d[1]] = 0
            if args:
                return (x[None], *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": x[None]}
        return hook

    def target(self, run, graph, row_node: int) -> float:
        """The input of the graph's node ``row_node`` in an oracle run."""
        pre, logits, _ = run
        key = graph.nodes.key(graph.ids[row_node])
        if key[0] == "f":
            return float(pre[key[1]][key[2], key[3]])
        good, bad = graph.nodes.vectors[key[1]]
        return float(logits[good] - (logits.mean() if bad is None else logits[bad]))


def logit_scale(hf) -> float:
    """What the model multiplies the unembedding's output by, by hand (Granite divides)."""
    return 1 / hf.config.logits_scaling if hf.config.model_type == "granite" else 1.0


def _eps(norm) -> float:
    return norm.eps if hasattr(norm, "eps") else norm.variance_epsilon


# -- models and transcoders ------------------------------------------------------------------

def random_transcoders(n_layers: int, d: int, d_sae: int = 48, seed: int = 0,
                       dtype: torch.dtype = torch.float32) -> dict:
    """ReLU transcoders with about a tenth of their latents active."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for layer in range(n_layers):
        tc = SAE(d, d_sae, apply_b_dec_to_input=False, dtype=dtype)
        with torch.no_grad():
            tc.W_enc.copy_(torch.randn(d, d_sae, generator=gen) / d ** 0.5 * 2)
            tc.W_dec.copy_(torch.randn(d_sae, d, generator=gen) * 0.1)
            tc.b_enc.copy_(torch.randn(d_sae, generator=gen) * 0.3 - 1.5)
            tc.b_dec.copy_(torch.randn(d, generator=gen) * 0.05)
        out[layer] = tc.requires_grad_(False)
    return out


def scrambled_norms(hf):
    """Norm weights and biases away from 1 and 0, so a wrong formula shows."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for norm, _ in parts(hf)[1]:
            norm.weight.copy_(1 + 0.3 * torch.randn(norm.weight.shape, generator=gen))
            if getattr(norm, "bias", None) is not None:
                norm.bias.copy_(0.2 * torch.randn(norm.bias.shape, generator=gen))
    return hf


def tiny_gemma2(vocab: int):
    from tests.conftest import tiny_family

    return tiny_family("gemma2", vocab, hidden_size=32, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                       intermediate_size=64, max_position_embeddings=64, sliding_window=4,
                       bos_token_id=0, eos_token_id=0, pad_token_id=1)


def tiny_granite(vocab: int):
    """Granite with every multiplier away from 1: the embedding's, the residual's, the
    attention's and the logits' (divided by logits_scaling)."""
    from tests.conftest import tiny_family

    return tiny_family("granite", vocab, hidden_size=32, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                       max_position_embeddings=64, embedding_multiplier=2.0,
                       residual_multiplier=0.5, attention_multiplier=0.3, logits_scaling=4.0,
                       bos_token_id=0, eos_token_id=0, pad_token_id=1)


TINY = {"gemma2": tiny_gemma2, "granite": tiny_granite}


@pytest.fixture(scope="module",
                params=["gpt2", "llama", "gemma2", "granite", "demo", "shipped"])
def setup(request, demo):
    if request.param == "demo":
        return "demo", demo, random_transcoders(4, 128, seed=3)
    if request.param == "shipped":  # the demo model with the transcoders it ships
        return "shipped", demo, ii.load_transcoders("demo")
    make = TINY.get(request.param, lambda vocab: tiny_model(request.param, vocab))
    hf = scrambled_norms(make(len(demo.tokenizer))).double()
    model = ii.wrap(hf, demo.tokenizer)
    return request.param, model, random_transcoders(3, 32, seed=3, dtype=torch.float64)


def ids_of(model, prompt):
    return model.tokenizer(prompt, return_tensors="pt")["input_ids"]


# -- the checks ------------------------------------------------------------------------------

@pytest.mark.parametrize("prompt", PROMPTS)
def test_inputs_are_bias_plus_incoming_edges(setup, prompt):
    name, model, tcs = setup
    g = ii.attribution_graph(model, prompt, tcs)
    oracle = Oracle(model.module, ids_of(model, prompt), tcs)
    full, empty = oracle.run(), oracle.run(acts={i: a * 0 for i, a in oracle.acts.items()},
                                           drop=_all_errors_and_tokens(g))
    assert g.exactness() < TOL
    for r, node in enumerate(g.target_rows.tolist()):
        value, bias = oracle.target(full, g, node), oracle.target(empty, g, node)
        assert close(float(g.values[r]), value, model), (name, g.ids[node])
        assert close(float(g.bias[r]), bias, model), (name, g.ids[node])
        edges = float(g.adjacency[node].double().sum())
        assert close(bias + edges, value, model), (name, g.ids[node])
    # the frozen model at the prompt is the model: its logits are the model's
    assert torch.allclose(oracle.run()[1], oracle.unembedded, atol=1e-4)


def _all_errors_and_tokens(g):
    n = g.nodes
    return [("e", l, p) for l in range(n.n_layers) for p in range(n.n_pos)] + \
        [("t", p) for p in range(n.n_pos)]


@pytest.mark.parametrize("prompt", PROMPTS[:2])
def test_each_edge_is_the_change_when_its_source_is_removed(setup, prompt):
    name, model, tcs = setup
    g = ii.attribution_graph(model, prompt, tcs, batch_size=7)
    oracle = Oracle(model.module, ids_of(model, prompt), tcs)
    full = oracle.run()
    n = g.nodes
    gen = torch.Generator().manual_seed(len(prompt))
    feats = torch.randperm(len(n.features), generator=gen)[:4].tolist()
    sources = feats + [n.error_start + 1, n.error_start + n.n_pos + 2, n.token_start,
                       n.token_start + n.n_pos - 1]
    targets = g.target_rows.tolist()
    for s in sources:
        key = n.key(g.ids[s])
        without = oracle.run(drop=[key])
        for t in targets:
            change = oracle.target(full, g, t) - oracle.target(without, g, t)
            assert close(float(g.adjacency[t, s]), change, model), (name, g.ids[s], g.ids[t])


def test_rows_do_not_depend_on_the_batch_size(setup):
    _, model, tcs = setup
    a = ii.attribution_graph(model, PROMPTS[2], tcs, batch_size=3)
    b = ii.attribution_graph(model, PROMPTS[2], tcs, batch_size=64)
    assert a.ids == b.ids
    assert torch.allclose(a.adjacency, b.adjacency, atol=1e-5)


@pytest.mark.parametrize("prompt", PROMPTS[:2])
def test_predicted_ablation_is_the_frozen_models_and_the_unfrozen_is_reported(setup, prompt):
    name, model, tcs = setup
    g = ii.attribution_graph(model, prompt, tcs)
    oracle = Oracle(model.module, ids_of(model, prompt), tcs)
    base = oracle.run(linear=True)
    n = g.nodes
    # the features with the biggest direct effect on the first output, and a random one
    row = g.adjacency[n.n_sources, :len(n.features)].abs()
    picks = row.topk(2).indices.tolist() + [len(n.features) // 2]
    for i in picks:
        node = g.ids[i]
        r = g.intervene({node: 0})
        ablated = oracle.run(linear=True, drop=[n.key(node)])
        for k in range(len(n.logits)):
            out = n.n_sources + k
            frozen = oracle.target(ablated, g, out) - oracle.target(base, g, out)
            assert close(float(r.predicted[k]), frozen, model), (name, node)
            assert close(float(r.frozen[k]), frozen, model), (name, node)
        # the unfrozen replacement model (attention and norms live), by hand
        live, raw = _unfrozen_oracle(oracle, n.key(node))
        assert torch.allclose(r.after.double(), live.double(), rtol=1e-5, atol=1e-4), node
        assert torch.allclose(r.before.double(), oracle.logits.double(), rtol=1e-5, atol=1e-4)
        for k, (good, bad) in enumerate(n.vectors):  # in the output nodes' units (pre-cap)
            def node_value(x):
                return float(x[good] - (x.mean() if bad is None else x[bad]))
            change = node_value(raw) - node_value(oracle.unembedded)
            assert close(float(r.unfrozen[k]), change, model), (name, node)
        assert "unfrozen" in repr(r)


@torch.no_grad()
def _unfrozen_oracle(oracle: Oracle, key) -> tuple[torch.Tensor, torch.Tensor]:
    """The model with each MLP replaced by relu(x W_enc + b_enc) W_dec + b_dec + recorded
    error, one latent zeroed; attention and norms live: its last-position logits and the
    unembedding's output there times the logit scale (before any soft-cap)."""
    head: list = []
    current: dict = {}
    handles = [oracle.head.register_forward_hook(lambda m, a, o: head.append(o[0, -1]))]
    for i, (inner, outer) in enumerate(oracle.mlps):
        box: list = []
        handles.append(inner.register_forward_hook(lambda m, a, o, box=box: box.append(a[0])))

        def hook(m, args, output, i=i, box=box):
            a = torch.relu(oracle.pre(i, box.pop()[0]))
            if key[1] == i:
                a[key[2], key[3]] = 0
            current[i] = a
            return (oracle.decode(i, current) + oracle.errors[i])[None]
        handles.append(outer.register_forward_hook(hook))
    try:
        return oracle.hf(input_ids=oracle.ids).logits[0, -1], head[0] * oracle.scale
    finally:
        for h in handles:
            h.remove()


def test_a_logit_diff_target_is_one_output_node(demo):
    tcs = random_transcoders(4, 128, seed=5)
    g = ii.attribution_graph(demo, PROMPTS[0], tcs, target=ii.logit_diff("Mary", "John"))
    oracle = Oracle(demo.module, ids_of(demo, PROMPTS[0]), tcs)
    logits = oracle.run()[1]
    assert g.ids[-1] == "logit:diff" and len(g.nodes.logits) == 1
    diff = float(logits[demo.token_id("Mary")] - logits[demo.token_id("John")])
    assert abs(float(g.values[-1]) - diff) < TOL
    assert g.exactness() < TOL


def test_fewer_expanded_features_still_add_up(demo):
    tcs = random_transcoders(4, 128, seed=5)
    g = ii.attribution_graph(demo, PROMPTS[1], tcs, max_feature_nodes=10, batch_size=4)
    full = ii.attribution_graph(demo, PROMPTS[1], tcs)
    assert len(g.nodes.features) == 10 < len(full.nodes.features)
    assert g.exactness() < TOL and float(g.dropped_in.abs().sum()) > 0
    for node in g.ids:  # an expanded feature's row is the full graph's, restricted
        if node.startswith("f"):
            assert abs(g.edge("t0", node) - full.edge("t0", node)) < 1e-5


def test_exact_transcoders_leave_no_error(demo):
    """A ReLU GPT-2 whose transcoders are its own MLPs: every error is 0, the replacement
    and completeness scores are 1, and the unfrozen intervention is the model's."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(demo.tokenizer), n_positions=64, n_embd=32, n_layer=2,
                     n_head=4, activation_function="relu", resid_pdrop=0.0, embd_pdrop=0.0,
                     attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, pad_token_id=1)
    hf = GPT2LMHeadModel(cfg).eval()
    tcs = {}
    for i, block in enumerate(hf.transformer.h):
        tc = SAE(32, 128, apply_b_dec_to_input=False)
        with torch.no_grad():
            tc.W_enc.copy_(block.mlp.c_fc.weight)
            tc.b_enc.copy_(block.mlp.c_fc.bias)
            tc.W_dec.copy_(block.mlp.c_proj.weight)
            tc.b_dec.copy_(block.mlp.c_proj.bias)
        tcs[i] = tc
    model = ii.wrap(hf, demo.tokenizer)
    g = ii.attribution_graph(model, PROMPTS[2], tcs)
    n = g.nodes
    assert float(g.adjacency[:, n.error_start:n.token_start].abs().max()) < 1e-5
    assert g.replacement_score > 1 - 1e-5 and g.completeness_score > 1 - 1e-5
    node = n.ids[0]
    r = g.intervene({node: 0})
    live = g.intervene({node: 0}, errors="live")
    assert torch.allclose(r.after, live.after, atol=1e-4)
