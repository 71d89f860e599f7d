"""Sites inside attention (q, k, v, pattern, z) against an oracle: attention computed by hand
in plain PyTorch, plugged in through transformers' public attention interface, on GPT-2, NeoX
and Llama (GQA) shapes loaded with eager and with SDPA attention."""

from __future__ import annotations

import pytest
import torch

import ipy_intervene as ii
from ipy_intervene.arch import attention
from ipy_intervene.errors import SiteError, ValueMismatchError
from attention_oracle import logits_by_hand
from conftest import CORRUPT, LAYERS, PROMPT, hook_count

ATTN = {"gpt2": "attn", "neox": "attention", "llama": "self_attn"}
LAYER = 1
BY_HAND = ("q", "k", "v", "pattern", "z")  # what the oracle's attention computes; `result` below


@pytest.fixture
def case(attention_case):
    arch, _, model = attention_case
    return arch, model


def site(arch: str, name: str, layer: int = LAYER) -> str:
    top, blocks = LAYERS[arch]
    return f"model.{top}.{blocks}[{layer}].{ATTN[arch]}.{name}"


def oracle(model: ii.Model, texts: list[str], edit=None) -> tuple[torch.Tensor, dict]:
    """Logits with attention by hand; layer LAYER's values, changed by ``edit(name, x)``."""
    patch = (lambda layer, name, x: edit(name, x) if layer == LAYER else x) if edit else None
    logits, seen = logits_by_hand(model, texts, patch)
    return logits, seen[LAYER]


@torch.no_grad()
def test_reads_equal_attention_by_hand(case):
    arch, model = case
    ns = {"model": model}
    body = "\n".join(f"{n} = {site(arch, n)}.output" for n in BY_HAND)
    ii.trace(model, body + "\nlogits = model.lm_head.output", PROMPT, namespace=ns)
    logits, seen = oracle(model, [PROMPT])
    for name in BY_HAND:
        torch.testing.assert_close(ns[name], seen[name], rtol=0, atol=1e-5, msg=name)
    torch.testing.assert_close(ns["logits"], logits, rtol=0, atol=1e-5)
    assert ns["k"].shape[1] == (2 if arch == "llama" else 4)  # GQA: kv heads
    assert model.module.config._attn_implementation == case[1].module.config._attn_implementation


@torch.no_grad()
def test_the_pattern_is_the_eager_models_own(case):
    arch, model = case
    ns = {"model": model}
    ii.trace(model, f"p = {site(arch, 'pattern')}.output\nlogits = model.lm_head.output", PROMPT,
             namespace=ns)
    before = model.module.config._attn_implementation
    model.module.set_attn_implementation("eager")
    try:
        out = model.module(model.to_tokens(PROMPT), output_attentions=True)
    finally:
        model.module.set_attn_implementation(before)
    assert torch.equal(ns["p"], out.attentions[LAYER])
    assert torch.equal(ns["logits"], out.logits)


def _ablate_head(name, x):
    x = x.clone()
    if name == "pattern":
        x[:, 1] = 0
        x[:, 1, :, 0] = 1  # head 1 attends only to the first token
    return x


def _scale(target):
    def edit(name, x):
        if name != target:
            return x
        x = x.clone()
        (x[:, :, 0] if name == "z" else x[:, 0]).mul_(2)
        return x
    return edit


@torch.no_grad()
@pytest.mark.parametrize("cell, edit", [
    ("{p}.output[:, 1] = 0\n{p}.output[:, 1, :, 0] = 1", _ablate_head),
    ("{q}.output[:, 0] *= 2", _scale("q")),
    ("{k}.output[:, 0] *= 2", _scale("k")),
    ("{v}.output[:, 0] *= 2", _scale("v")),
    ("{z}.output[:, :, 0] *= 2", _scale("z")),
], ids=["pattern", "q", "k", "v", "z"])
def test_writes_change_the_forward_as_by_hand(case, cell, edit):
    arch, model = case
    names = {n[0]: site(arch, n) for n in attention.ATTENTION_SITES}
    ns = {"model": model}
    ii.trace(model, cell.format(**names) + "\nlogits = model.lm_head.output", PROMPT,
             namespace=ns)
    logits, _ = oracle(model, [PROMPT], edit)
    plain, _ = oracle(model, [PROMPT])
    assert (logits - plain).abs().max() > 1e-4  # the edit matters: 10x the tolerance
    torch.testing.assert_close(ns["logits"], logits, rtol=0, atol=1e-5)


@torch.no_grad()
def test_patching_a_pattern_from_another_invoke(case):
    arch, model = case
    p = site(arch, "pattern")
    ns = {"model": model, "clean": PROMPT, "corrupt": CORRUPT}
    ii.trace(model, f"with tracer.invoke(clean):\n    saved = {p}.output\n"
                    f"with tracer.invoke(corrupt):\n    {p}.output = saved\n"
                    "    logits = model.lm_head.output", namespace=ns)
    _, clean = oracle(model, [PROMPT])
    logits, _ = oracle(model, [CORRUPT], lambda n, x: clean["pattern"] if n == "pattern" else x)
    torch.testing.assert_close(ns["logits"], logits, rtol=0, atol=1e-5)


def test_a_failing_cell_leaves_the_implementation_and_no_hook(demo):
    ns = {"model": demo}
    with pytest.raises(ValueMismatchError, match="does not broadcast"):
        ii.trace(demo, "p = model.transformer.h[0].attn.pattern.output\n"
                       "model.transformer.h[0].attn.pattern.output = p[:, :2]", PROMPT,
                 namespace=ns)
    assert demo.module.config._attn_implementation == "sdpa"
    assert "p" not in ns and hook_count(demo.module) == 0
    points = attention.point(demo.module.transformer.h[0].attn, "pattern")
    assert hook_count(points) == 0


def test_sites_only_exist_on_attention_modules(demo):
    with pytest.raises(SiteError, match="`pattern` is not a module or attribute"):
        ii.trace(demo, "p = model.transformer.h[0].mlp.pattern.output", PROMPT,
                 namespace={"model": demo})
    assert "pattern" in dir(demo.transformer.h[0].attn)


PROJ = {"gpt2": "c_proj", "neox": "dense", "llama": "o_proj"}


def _per_head_write(proj, z_flat: torch.Tensor, head: int, n_heads: int) -> torch.Tensor:
    """Head ``head``'s write through the out-projection, from the projection's input."""
    d = z_flat.shape[-1] // n_heads
    x = z_flat[..., head * d:(head + 1) * d]
    if type(proj).__name__ == "Conv1D":
        return x @ proj.weight[head * d:(head + 1) * d]
    return x @ proj.weight[:, head * d:(head + 1) * d].T


def _proj(model, arch: str):
    top, blocks = LAYERS[arch]
    attn = getattr(getattr(model.module, top), blocks)[LAYER]
    return getattr(getattr(attn, ATTN[arch]), PROJ[arch])


@torch.no_grad()
def test_result_is_each_heads_write_through_the_out_projection(case):
    arch, model = case
    proj_site = f"{site(arch, '')[:-1]}.{PROJ[arch]}"
    ns = {"model": model}
    ii.trace(model, f"r = {site(arch, 'result')}.output\nz_in = {proj_site}.input\n"
                    f"out = {proj_site}.output", PROMPT, namespace=ns)
    proj, n_heads = _proj(model, arch), ns["r"].shape[2]
    for head in range(n_heads):
        torch.testing.assert_close(ns["r"][:, :, head],
                                   _per_head_write(proj, ns["z_in"], head, n_heads),
                                   rtol=0, atol=1e-5)
    bias = proj.bias if proj.bias is not None else 0
    torch.testing.assert_close(ns["r"].sum(2) + bias, ns["out"], rtol=0, atol=1e-5)


@torch.no_grad()
def test_writing_result_equals_a_plain_hook_on_the_out_projection(case):
    arch, model = case
    ns = {"model": model}
    ii.trace(model, f"{site(arch, 'result')}.output[:, -1, 1] *= 3\n"
                    "logits = model.lm_head.output", PROMPT, namespace=ns)
    proj = _proj(model, arch)
    n_heads = model.module.config.num_attention_heads

    def triple_head_1(module, args, output):
        extra = 2 * _per_head_write(module, args[0], 1, n_heads)
        output = output.clone()
        output[:, -1] += extra[:, -1]
        return output

    handle = proj.register_forward_hook(triple_head_1)
    try:
        expected = model.module(**model.prepare([PROMPT]).kwargs).logits
    finally:
        handle.remove()
    plain = model.module(**model.prepare([PROMPT]).kwargs).logits
    assert (expected - plain).abs().max() > 1e-4
    torch.testing.assert_close(ns["logits"], expected, rtol=0, atol=1e-5)
    assert hook_count(proj) == 0
