"""bfloat16 and float16 models: every method x sweep site x metric kind runs to the end,
stores float32, and equals the naive plain-hooks loop run in the same dtype.

Tolerance: 8 x the dtype's eps x (1 + the largest |value|), absolute. Batching changes the
order of float operations, and a rounding in an early layer grows on its way to the logits
(up to ~3 eps x (1 + |value|) measured here, in float16 Llama; most cells are bit-identical).
A custom metric's numbers are averaged in float32 by the sweep. Each case checks that the
per-prompt effects span more than twice the tolerance, so the comparison can fail: a wrong
layer, position or head is far outside it.

Each (method, site) runs in both dtypes, on a different architecture for each, so the three
architectures share the cases and the file stays quick on a CPU. Causal tracing at the sites
no other file checks also runs in float32, at the float32 tolerance of the other oracle tests.
"""

from __future__ import annotations

import pytest
import torch

import ipy_intervene as ii
from conftest import ARCHS, CORRUPT, PROMPT, tiny_model
from sweep_oracle import (PARTS, cells, get, hand_attribution, naive_activation,
                          naive_causal_trace, patched_logits, record_site, serial_neox)

DTYPES = (torch.bfloat16, torch.float16)
SITES = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "head_out",
         "head_out_pos")
PAIRS = [(method, site) for method in ("activation", "attribution", "noise") for site in SITES]
CASES = [pytest.param(method, site, dtype, ARCHS[(i + j) % len(ARCHS)],
                      id=f"{method}-{site}-{str(dtype).removeprefix('torch.')}")
         for i, (method, site) in enumerate(PAIRS) for j, dtype in enumerate(DTYPES)]
CLEAN = [PROMPT, PROMPT.replace("store", "park")]
CORRUPTED = [CORRUPT, CORRUPT.replace("store", "park")]
SUBJECT = [2, 3, 4]  # "Mary and John"


@pytest.fixture(scope="module")
def models(demo):
    """``models(arch, dtype, serial)``: a tiny model at 32x the usual weight scale (effects
    well above bfloat16's precision) in ``dtype``; ``serial``: NeoX with resid_mid."""
    made: dict = {}

    def model(arch: str, dtype: torch.dtype, serial: bool = False) -> ii.Model:
        if (arch, dtype, serial) not in made:
            vocab = len(demo.tokenizer)
            module = serial_neox(vocab) if serial else tiny_model(arch, vocab)
            with torch.no_grad():
                for param in module.parameters():
                    if param.dim() == 2:
                        param.mul_(32)
            made[arch, dtype, serial] = ii.wrap(module.to(dtype), demo.tokenizer)
        return made[arch, dtype, serial]

    return model


def metric_kinds(model):
    """(name, metric given to the sweep, the same metric per prompt for the naive loop)."""
    good, bad = model.token_id("Mary"), model.token_id("John")
    plain = lambda l: l[:, -1, good] - l[:, -1, bad]  # noqa: E731 - as users write it
    return [("logit_diff", ii.logit_diff("Mary", "John"),
             lambda l: l[:, -1, good].float() - l[:, -1, bad].float()),
            ("callable", plain, plain),
            ("scalar", lambda l: plain(l).mean(), plain)]


@torch.no_grad()
def naive_noise_heads(module, arch, site, kwargs, metric, samples=2, seed=0):
    """Causal tracing of one head (at one position) at a time, written like
    ``naive_causal_trace`` (window 1): noise the subject, restore the clean head."""
    emb = get(module, PARTS[arch]["embed"])(kwargs["input_ids"])
    length = emb.shape[1]
    std = 3.0 * float(emb[:, SUBJECT].std())
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(samples, 1, length, emb.shape[-1], generator=gen) * std
    mask = torch.zeros(length, 1)
    mask[SUBJECT] = 1
    noise = (noise * mask).reshape(samples, length, -1)
    noised = {k: v.repeat(samples, 1) for k, v in kwargs.items()}
    clean, _ = record_site(module, arch, site, range(3), kwargs)
    rows = []
    for layer, pos, head in cells(site, 3, length, 4):
        patch = [(layer, pos, head, clean[layer].repeat(samples, 1, 1))]
        logits = patched_logits(module, arch, site, patch, noised, 4, noise=noise)
        rows.append(metric(logits).float().view(samples, 1).mean(0))
    return torch.stack(rows)


def naive(model, arch, method, site, metric):
    """[cells, prompts] from the plain-hooks loop, in the model's dtype, as float32."""
    if method == "noise":
        kwargs = model.prepare([PROMPT]).kwargs
        if site.startswith("head"):
            return naive_noise_heads(model.module, arch, site, kwargs, metric)
        return naive_causal_trace(model.module, arch, site, kwargs, SUBJECT,
                                  lambda l: metric(l).float(), 3, samples=2, seed=0, window=1)
    a, b = model.prepare(CLEAN).kwargs, model.prepare(CORRUPTED).kwargs
    loop = naive_activation if method == "activation" else hand_attribution
    return loop(model.module, arch, site, b, a, metric, 3, 4).float()


def sweep(model, method, site, metric):
    if method == "noise":
        return ii.patch_sweep(model, PROMPT, metric=metric, method=method, site=site,
                              subject="Mary and John", samples=2, seed=0)
    return ii.patch_sweep(model, CLEAN, CORRUPTED, metric, method=method, site=site)


@pytest.mark.parametrize("method, site, dtype, arch", CASES)
def test_half_precision_sweeps_equal_the_naive_loop_in_the_same_dtype(models, method, site,
                                                                      dtype, arch):
    model = models(arch, dtype, serial=arch == "neox" and site == "resid_mid")
    tol = None
    for name, metric, oracle in metric_kinds(model):
        result = sweep(model, method, site, metric)
        expected = naive(model, arch, method, site, oracle)
        expected = expected.reshape(*result.raw.shape, expected.shape[-1])
        assert result.raw.dtype == result.values.dtype == torch.float32, name
        assert torch.isfinite(expected).all(), name
        if tol is None:  # from the built-in metric: the same cells for every kind
            tol = 8 * torch.finfo(dtype).eps * (1 + float(expected.abs().max()))
            assert float(expected.max() - expected.min()) > 2 * tol  # the check can fail
        if name == "scalar" and expected.shape[-1] > 1:
            got, expected = result.raw, expected.mean(-1)  # no per_prompt (tested elsewhere)
        else:
            got = result.per_prompt
        torch.testing.assert_close(got, expected, rtol=0, atol=tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("site", ["resid_pre", "resid_mid", "head_out", "head_out_pos"])
def test_causal_tracing_at_every_site_equals_the_naive_loop_in_float32(models, arch, site):
    model = models(arch, torch.float32, serial=arch == "neox" and site == "resid_mid")
    metric = ii.logit_diff("Mary", "John")
    result = sweep(model, "noise", site, metric)
    expected = naive(model, arch, "noise", site, metric.bind(model, 1)).reshape(result.raw.shape)
    torch.testing.assert_close(result.raw, expected, rtol=0, atol=1e-5)
    assert float(expected.max() - expected.min()) > 1.0  # the check can fail
