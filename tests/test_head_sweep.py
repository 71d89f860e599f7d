"""Sweeps over the sites inside attention against a naive loop: one forward per cell, with
attention computed by hand in plain PyTorch (plugged in through transformers' public
attention interface), on GPT-2, NeoX and Llama (GQA) shapes."""

from __future__ import annotations

import pytest
import torch

import ipy_intervene as ii
from ipy_intervene.errors import InputError
from ipy_intervene.sweep.heads import head_sweep
from attention_oracle import logits_by_hand
from conftest import ARCHS, CORRUPT, PROMPT, hook_count, tiny_model

METRIC = ii.logit_diff("Mary", "John")


@pytest.fixture(scope="module", params=ARCHS)
def sharp(request, demo):
    """A tiny random model at 8x the usual weight scale: heads matter well above 1e-5."""
    module = tiny_model(request.param, len(demo.tokenizer))
    with torch.no_grad():
        for param in module.parameters():
            if param.dim() == 2:
                param.mul_(8)
    return ii.wrap(module, demo.tokenizer)


def run_by_hand(model, text, patch=None):
    logits, seen = logits_by_hand(model, [text], patch)
    return float(METRIC.bind(model, 1)(logits)), seen


def naive(model, name, cells):
    """Denoising, one forward per cell: the clean value of one head (at one position) in the
    corrupted run."""
    _, clean = run_by_hand(model, PROMPT)
    out = []
    for layer, head, pos in cells:
        def patch(l, n, x, layer=layer, head=head, pos=pos):
            if l != layer or n != name:
                return x
            x = x.clone()
            where = (slice(None), head) if pos is None else (slice(None), head, pos)
            x[where] = clean[layer][name][where]
            return x
        out.append(run_by_hand(model, CORRUPT, patch)[0])
    return torch.tensor(out)


@pytest.mark.parametrize("site", ["head_q", "head_k", "head_v", "head_pattern"])
def test_head_sweeps_equal_a_naive_loop(sharp, site):
    r = head_sweep(sharp, PROMPT, CORRUPT, METRIC, site=site, batch_size=5)
    cells = [(l, h, None) for l in r.layers for h in r.heads]
    expected = naive(sharp, site.removeprefix("head_"), cells).reshape(r.raw.shape)
    torch.testing.assert_close(r.raw, expected, rtol=0, atol=1e-5)
    assert (expected - r.corrupted).abs().max() > 1e-4  # the patches matter: 10x atol
    assert hook_count(sharp.module) == 0


@pytest.mark.parametrize("site", ["head_q_pos", "head_pattern_pos"])
def test_per_position_head_sweeps_equal_a_naive_loop(sharp, site):
    r = head_sweep(sharp, PROMPT, CORRUPT, METRIC, site=site, positions=[10, -1], batch_size=7)
    assert r.dims == ("layer", "pos", "head") and r.raw.shape == (3, 2, 4)
    cells = [(l, h, p) for l in r.layers for p in r.positions for h in r.heads]
    expected = naive(sharp, site.removeprefix("head_").removesuffix("_pos"), cells)
    torch.testing.assert_close(r.raw, expected.reshape(r.raw.shape), rtol=0, atol=1e-5)


def test_gqa_keys_are_per_kv_head(demo):
    llama = ii.wrap(tiny_model("llama", len(demo.tokenizer)), demo.tokenizer)
    assert head_sweep(llama, PROMPT, CORRUPT, METRIC, site="head_k").raw.shape == (3, 2)
    assert head_sweep(llama, PROMPT, CORRUPT, METRIC, site="head_q").raw.shape == (3, 4)


def test_an_unknown_attention_site_lists_them(demo):
    with pytest.raises(InputError, match="head_pattern_pos"):
        head_sweep(demo, PROMPT, CORRUPT, METRIC, site="head_o")


# -- through ii.patch_sweep and %patch_sweep ---------------------------------------------------

def test_patch_sweep_routes_attention_sites_lists_and_path_patching(demo):
    one = ii.patch_sweep(demo, PROMPT, CORRUPT, METRIC, site="head_v")
    assert torch.equal(one.raw, head_sweep(demo, PROMPT, CORRUPT, METRIC, site="head_v").raw)
    both = ii.patch_sweep(demo, PROMPT, CORRUPT, METRIC, site=["attn_out", "mlp_out"])
    assert list(both) == ["attn_out", "mlp_out"]
    alone = ii.patch_sweep(demo, PROMPT, CORRUPT, METRIC, site="mlp_out")
    torch.testing.assert_close(both["mlp_out"].raw, alone.raw, rtol=0, atol=1e-6)
    path = ii.patch_sweep(demo, PROMPT, CORRUPT, METRIC, method="path", receivers=[(3, 0)])
    assert torch.equal(path.raw, ii.path_patch(demo, PROMPT, CORRUPT, METRIC,
                                               receivers=[(3, 0)]).raw)
    with pytest.raises(InputError, match="method='activation'"):
        ii.patch_sweep(demo, PROMPT, CORRUPT, METRIC, site="head_pattern", method="attribution")


def test_the_magic_sweeps_several_sites_and_paths(shell):
    shell.user_ns.update(clean=PROMPT, corrupt=CORRUPT)
    base = '%patch_sweep model --clean clean --corrupted corrupt --metric logit_diff("Mary", "John")'
    shell.run_cell(base + " --site resid_pre,head_pattern --quiet --out both")
    both = shell.user_ns["both"]
    assert set(both) == {"resid_pre", "head_pattern"} and both["head_pattern"].dims == ("layer", "head")
    shell.run_cell(base + " --method path --receivers [(3, 0)] --receiver-input v --quiet")
    assert shell.user_ns["_sweep"].method == "path"
    assert shell.user_ns["_sweep"].extra["receiver_input"] == "v"
