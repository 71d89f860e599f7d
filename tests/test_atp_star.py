"""AtP* (ipy_intervene/sweep/atp_star.py) against its definitions computed by hand: the QK
fix from attention written out in plain PyTorch, GradDrop from plain autograd with each
layer's residual contribution detached in turn, and exact patching as the referee."""

from __future__ import annotations

import pytest
import torch
from transformers import AttentionInterface, GPT2Config, GPT2LMHeadModel
from transformers.masking_utils import AttentionMaskInterface, eager_mask

import ipy_intervene as ii
from ipy_intervene.errors import SiteError
from ipy_intervene.sweep import atp_star

from conftest import ARCHS, CORRUPT, PROMPT, layers, tiny_model

GOOD, BAD = 5, 7
HEAD_PROJ = {"gpt2": "c_proj", "neox": "dense", "llama": "o_proj"}
ATTN = {"gpt2": "attn", "neox": "attention", "llama": "self_attn"}


@pytest.fixture(scope="module", params=ARCHS)
def loud_model(request, demo):
    """The tiny models with their matrices scaled 6x: effects big enough (1e-2..1e-1) that
    a 1e-5 comparison is not vacuous."""
    module = tiny_model(request.param, len(demo.tokenizer))
    with torch.no_grad():
        for param in module.parameters():
            if param.dim() == 2:
                param.mul_(6.0)
    return request.param, ii.wrap(module, demo.tokenizer)


def ids(model, text):
    return model.tokenizer(text, return_tensors="pt").input_ids


def metric_by_hand(logits):
    return logits[0, -1, GOOD] - logits[0, -1, BAD]


# -- the QK fix ----------------------------------------------------------------------------


def run_by_hand(model, tokens, grad):
    """Logits with attention by hand; every layer's q, k, pattern, mask and scale."""
    seen = {}

    def attend(module, q, k, v, mask, scaling=None, **kwargs):
        rep = q.shape[1] // k.shape[1]
        scale = scaling if scaling is not None else q.shape[-1] ** -0.5
        scores = q @ k.repeat_interleave(rep, 1).transpose(-1, -2) * scale
        pattern = (scores + (0 if mask is None else mask)).softmax(-1)
        seen[module.layer_idx] = dict(q=q, k=k, pattern=pattern, mask=mask, scale=scale)
        return (pattern @ v.repeat_interleave(rep, 1)).transpose(1, 2), pattern

    AttentionInterface.register("h5_by_hand", attend)
    AttentionMaskInterface.register("h5_by_hand", eager_mask)
    before = model.module.config._attn_implementation
    model.module.set_attn_implementation("h5_by_hand")
    try:
        with torch.set_grad_enabled(grad):
            logits = model.module(input_ids=tokens).logits
    finally:
        model.module.set_attn_implementation(before)
    return metric_by_hand(logits), seen


def softmax_of(q, k, mask, scale):
    rep = q.shape[1] // k.shape[1]
    scores = q @ k.repeat_interleave(rep, 1).transpose(-1, -2) * scale
    return (scores + (0 if mask is None else mask)).softmax(-1)


def qk_fix_by_hand(model, site):
    """Every cell's effect: sum (A' - A) * dM/dA, A' the exact softmax of the patched scores."""
    _, clean = run_by_hand(model, ids(model, PROMPT), grad=False)
    base_metric, base = run_by_hand(model, ids(model, CORRUPT), grad=True)
    n_layers = len(base)
    grads = torch.autograd.grad(base_metric, [base[l]["pattern"] for l in range(n_layers)])
    out = []
    for l in range(n_layers):
        b, g = base[l], grads[l]
        if site.startswith("head_q"):
            change = softmax_of(clean[l]["q"], b["k"], b["mask"], b["scale"]) - b["pattern"]
            per = (change * g).sum(-1)[0]                                # [H, Pq]
            cells = per.sum(-1) if site == "head_q" else per.T           # [H] or [P, H]
        else:
            kv, rep = b["k"].shape[1], b["q"].shape[1] // b["k"].shape[1]
            positions = [None] if site == "head_k" else range(b["k"].shape[2])
            cols = []
            for pos in positions:
                keys = clean[l]["k"] if pos is None else b["k"].clone()
                if pos is not None:
                    keys[:, :, pos] = clean[l]["k"][:, :, pos]
                change = softmax_of(b["q"], keys, b["mask"], b["scale"]) - b["pattern"]
                per_head = (change * g).sum((-1, -2))[0]                  # [H]
                cols.append(per_head.view(kv, rep).sum(-1))              # [kv]
            cells = cols[0] if site == "head_k" else torch.stack(cols)   # [kv] or [P, kv]
        out.append(cells.detach())
    return torch.stack(out)


@pytest.mark.parametrize("site", ["head_q", "head_q_pos", "head_k", "head_k_pos"])
def test_qk_fix_equals_the_exact_softmax_times_the_pattern_gradient(loud_model, site):
    arch, model = loud_model
    result = atp_star.sweep(model, PROMPT, CORRUPT, ii.logit_diff(GOOD, BAD), site=site,
                            grad_drop=False)
    expected = qk_fix_by_hand(model, site)
    effects = result.raw - result.corrupted
    assert effects.shape == expected.shape
    assert torch.allclose(effects, expected, atol=1e-5), (effects - expected).abs().max()
    assert expected.abs().max() > 1e-3                              # not vacuous


def test_linear_q_term_without_the_fix_is_the_gradient_times_the_change(loud_model):
    arch, model = loud_model
    result = atp_star.sweep(model, PROMPT, CORRUPT, ii.logit_diff(GOOD, BAD), site="head_q_pos",
                            grad_drop=False, qk_fix=False)
    _, clean = run_by_hand(model, ids(model, PROMPT), grad=False)
    base_metric, base = run_by_hand(model, ids(model, CORRUPT), grad=True)
    qs = [base[l]["q"] for l in range(len(base))]
    grads = torch.autograd.grad(base_metric, qs)
    expected = torch.stack([((clean[l]["q"] - q) * g).sum(-1)[0].T
                            for l, (q, g) in enumerate(zip(qs, grads))]).detach()
    assert torch.allclose(result.raw - result.corrupted, expected, atol=1e-5)
    assert expected.abs().max() > 1e-3


# -- GradDrop ------------------------------------------------------------------------------


def site_grads_by_hand(model, arch, tokens, site, dropped):
    """The site's value at every layer and d metric / d site, with block ``dropped``'s
    output detached except for its skip path (None: nothing dropped)."""
    blocks, handles, values, inputs = layers(model, arch), [], {}, {}

    for l, block in enumerate(blocks):
        handles.append(block.register_forward_pre_hook(
            lambda m, args, kwargs, l=l: inputs.__setitem__(l, args[0] if args else
                                                            kwargs["hidden_states"]),
            with_kwargs=True))
        if l == dropped:
            def cut(m, args, out, l=l):
                first = out[0] if isinstance(out, tuple) else out
                x = inputs[l]
                new = first.detach() + (x - x.detach())
                return (new, *out[1:]) if isinstance(out, tuple) else new
            handles.append(block.register_forward_hook(cut))
        if site == "mlp_out":
            handles.append(block.mlp.register_forward_hook(
                lambda m, a, out, l=l: values.__setitem__(l, out)))
        else:
            proj = getattr(getattr(block, ATTN[arch]), HEAD_PROJ[arch])
            handles.append(proj.register_forward_pre_hook(
                lambda m, args, l=l: values.__setitem__(l, args[0])))
    try:
        metric = metric_by_hand(model.module(input_ids=tokens).logits)
    finally:
        for h in handles:
            h.remove()
    order = range(len(blocks))
    grads = torch.autograd.grad(metric, [values[l] for l in order], allow_unused=True)
    grads = [torch.zeros_like(values[l]) if g is None else g for l, g in zip(order, grads)]
    return metric.detach(), [values[l].detach() for l in order], grads


@pytest.mark.parametrize("site", ["mlp_out", "head_out_pos"])
def test_grad_drop_equals_its_definition_by_hand(loud_model, site):
    arch, model = loud_model
    result = atp_star.sweep(model, PROMPT, CORRUPT, ii.logit_diff(GOOD, BAD), site=site,
                            grad_drop=True)
    clean_metric, clean, _ = site_grads_by_hand(model, arch, ids(model, PROMPT), site, None)
    n_layers = len(clean)
    total = 0
    for dropped in range(n_layers):                     # every layer, the cell's own included
        base_metric, base, grads = site_grads_by_hand(model, arch, ids(model, CORRUPT), site,
                                                      dropped)
        per_layer = []
        for c, b, g in zip(clean, base, grads):
            product = ((c - b) * g)[0]                                        # [P, D]
            if site == "head_out_pos":
                heads = model.module.config.num_attention_heads
                product = product.view(product.shape[0], heads, -1)
            per_layer.append(product.sum(-1))
        total = total + torch.stack(per_layer).abs()
    magnitude = total / (n_layers - 1)
    ours = result.raw - result.corrupted                # denoising: towards clean by it
    ours = ours if clean_metric > base_metric else -ours
    assert ours.shape == magnitude.shape
    assert torch.allclose(ours, magnitude, atol=1e-5), (ours - magnitude).abs().max()
    assert magnitude.max() > 1e-3
    assert bool((result.values >= 0).all()) and result.extra["estimate"] == "magnitude"


def test_grad_drop_differs_from_plain_attribution(demo):
    plain = atp_star.sweep(demo, PROMPT, CORRUPT, ii.logit_diff("John", "Mary"), site="mlp_out",
                           grad_drop=False)
    dropped = atp_star.sweep(demo, PROMPT, CORRUPT, ii.logit_diff("John", "Mary"),
                             site="mlp_out", grad_drop=True)
    assert not torch.allclose(plain.values.abs(), dropped.values, atol=1e-3)
    last = dropped.values[-1]          # the last layer has no later layer to drop: |plain|
    assert torch.allclose(last, plain.values[-1].abs(), atol=1e-6)
    assert dropped.extra["cost"]["backwards"] == demo_layers(demo)


def demo_layers(model):
    return model.module.config.n_layer


# -- plain settings are attribution patching -----------------------------------------------


@pytest.mark.parametrize("site", ["mlp_out", "attn_out", "head_out", "head_out_pos"])
@pytest.mark.parametrize("direction", ["denoising", "noising"])
def test_without_qk_fix_and_grad_drop_it_is_the_attribution_sweep(arch_model, site, direction):
    arch, model = arch_model
    metric = ii.logit_diff(GOOD, BAD)
    ours = atp_star.sweep(model, PROMPT, CORRUPT, metric, site=site, direction=direction,
                          grad_drop=False, qk_fix=False)
    theirs = ii.patch_sweep(model, PROMPT, CORRUPT, metric, site=site, direction=direction,
                            method="attribution")
    assert ours.dims == theirs.dims and ours.positions == theirs.positions
    assert torch.allclose(ours.values, theirs.values, atol=1e-5)
    assert torch.allclose(ours.raw, theirs.raw, atol=1e-5)
    assert (ours.clean, ours.corrupted) == pytest.approx((theirs.clean, theirs.corrupted))


# -- attention saturation: AtP* finds the head attribution misses --------------------------


def saturated_model():
    """Two GPT-2 layers; layer 1 head 0's queries and keys scaled 40x, so its softmax is
    saturated in the corrupted run: from the last token it looks at one position with
    probability ~1, where the clean query splits its weight with another position."""
    torch.manual_seed(5)
    config = GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=4,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                        eos_token_id=0)
    module = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        weight = module.transformer.h[1].attn.c_attn.weight      # Conv1D: [in, q | k | v]
        weight[:, 0:8] *= 40.0
        weight[:, 32:40] *= 40.0
    tokens = torch.randint(2, 64, (1, 8), generator=torch.Generator().manual_seed(5))
    corrupt = tokens.clone()
    corrupt[0, -1] = (tokens[0, -1] + 7) % 62 + 2
    return ii.wrap(module), tokens, corrupt


def test_atp_star_ranks_a_saturated_head_that_attribution_misses():
    model, clean, corrupt = saturated_model()
    metric = ii.logit_diff(3, 4)
    before = model.module.config._attn_implementation
    model.module.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            patterns = [model.module(input_ids=x, output_attentions=True).attentions[1][0, 0, -1]
                        for x in (clean, corrupt)]
    finally:
        model.module.set_attn_implementation(before)
    clean_row, corrupt_row = patterns
    assert float(corrupt_row.max()) > 0.999        # saturated in the run patched into
    moved = (clean_row > 0.3) & (corrupt_row < 0.01)
    assert bool(moved.any())                        # the clean query looks elsewhere too
    exact = ii.patch_sweep(model, clean, corrupt, metric, site="head_q", method="activation")
    star = atp_star.sweep(model, clean, corrupt, metric, site="head_q", grad_drop=False)
    plain = atp_star.sweep(model, clean, corrupt, metric, site="head_q", grad_drop=False,
                           qk_fix=False)
    head = {"layer": 1, "head": 0}
    assert _subset(exact.top(1)[0]) == head                        # the referee's top cell
    assert _subset(star.top(1)[0]) == head                         # AtP* finds it
    assert head not in [_subset(c) for c in plain.top(3)]          # attribution misses it
    assert abs(float(plain.values[1, 0])) < 0.05 * abs(float(exact.values[1, 0]))
    assert float(star.values[1, 0]) == pytest.approx(float(exact.values[1, 0]), rel=0.25)


def _subset(cell):
    return {"layer": cell["layer"], "head": cell["head"]}


# -- errors and costs ----------------------------------------------------------------------


def test_a_site_atp_star_does_not_sweep_is_an_error(demo):
    with pytest.raises(SiteError, match="AtP\\* sweeps the sites"):
        atp_star.sweep(demo, PROMPT, CORRUPT, ii.logit_diff("John", "Mary"), site="resid_pre")


def test_cost_counts_the_backward_passes(demo):
    metric = ii.logit_diff("John", "Mary")
    r = atp_star.sweep(demo, PROMPT, CORRUPT, metric, site="head_k_pos", layers=[2, 3])
    assert r.extra["cost"]["forwards"] == 2
    assert r.extra["cost"]["backwards"] == 1 + (demo_layers(demo) - 1 - 2)
    assert r.extra["cost"]["attention_calls"] >= 2 * 2
    plain = atp_star.sweep(demo, PROMPT, CORRUPT, metric, site="head_out", grad_drop=False)
    assert plain.extra["cost"]["backwards"] == 1


def test_it_runs_with_autograd_off_in_the_caller(demo):
    metric = ii.logit_diff("John", "Mary")
    with torch.no_grad():
        off = atp_star.sweep(demo, PROMPT, CORRUPT, metric, site="head_out")
    assert not torch.is_grad_enabled() or True
    on = atp_star.sweep(demo, PROMPT, CORRUPT, metric, site="head_out")
    assert torch.equal(off.values, on.values)
