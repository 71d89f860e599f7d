"""Gemma 4's block: Gemma 2's, then a late writer (the per-layer-input branch, added after the
MLP) and the whole stream times ``layer_scalar``. Its map (``families.GEMMA4``) is proven by
the self-check, its sites are exact against plain hooks one prompt at a time, and the
methods that sum the writers say why they have no meaning there. GPT-Neo's own attention
method carries the q/k/v/pattern sites (its matrix row checks them against its ``_attn``)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import ipy_intervene as ii
from ipy_intervene.arch import families
from ipy_intervene.arch.sites import adapter_for
from ipy_intervene.errors import SiteError

sys.path.insert(0, str(Path(__file__).resolve().parent))
import family_matrix as fm  # noqa: E402
import family_oracles as o  # noqa: E402


@pytest.fixture()
def gemma4():
    """The matrix's Gemma 4 (layer scalars 0.75 and 1.25)."""
    model = fm.model_of("gemma4_text")
    if isinstance(model, str):
        pytest.skip(model)
    assert families.FAMILIES["gemma4_text"] is families.GEMMA4
    model.module.set_attn_implementation("eager")
    return model


def test_gemma4_s_map_names_the_late_writer_and_the_block_scale_and_passes_its_check(gemma4):
    adapter = adapter_for(gemma4)
    assert (adapter.late_writer, adapter.block_scale) == ("post_per_layer_input_norm",
                                                          "layer_scalar")
    assert adapter.post_attn_norm == "post_attention_layernorm"


@pytest.mark.parametrize("missing, identity", [
    ("late_writer", r"layer_scalar \* \(resid_mid \+ mlp_out\) == resid_post does not hold"),
    ("block_scale", r"resid_mid \+ mlp_out \+ late_writer == resid_post does not hold")])
def test_a_gemma4_map_without_the_late_writer_or_the_scale_fails_its_check(gemma4, missing,
                                                                           identity):
    from dataclasses import replace

    wrong = replace(adapter_for(gemma4), **{missing: None})
    with pytest.raises(SiteError, match=identity):
        adapter_for(gemma4, wrong)


@pytest.mark.parametrize("site", ["resid_mid", "mlp_out", "resid_post"])
def test_gemma4_s_sites_are_exact_against_plain_hooks(gemma4, site):
    got = ii.patch_sweep(gemma4, o.ids(o.CLEAN), o.ids(o.CORRUPT), ii.logit_diff(o.GOOD, o.BAD),
                         site=site).per_prompt
    want = o.module_sweep(gemma4.module, adapter_for(gemma4), site)
    o.close(got, want, f"{site} sweep")
    assert float(want.max() - want.min()) > 1e-4


def test_what_sums_the_writers_says_why_it_has_no_meaning_on_gemma4(gemma4):
    reason = adapter_for(gemma4).unsummed("decompose")
    assert reason.startswith("decompose reads the residual stream as the sum of the embeddings")
    assert "gemma4_text block also has the output of post_per_layer_input_norm" in reason
    assert "a scale layer_scalar that multiplies the whole stream" in reason
    metric = ii.logit_diff(o.GOOD, o.BAD)
    for method, call in (
            ("edge attribution", lambda: ii.edge_attribution(gemma4, o.ids(o.CLEAN),
                                                             o.ids(o.CORRUPT), metric)),
            ("decompose", lambda: ii.decompose(gemma4, o.ids(o.CLEAN)[0], metric))):
        with pytest.raises(SiteError, match=f"{method} reads the residual stream as the sum .*"
                                            "gemma4_text block also has"):
            call()


def test_gpt_neo_s_sites_leave_its_attention_as_it_was(demo):
    model = fm.model_of("gpt_neo")
    if isinstance(model, str):
        pytest.skip(model)
    attn = model.module.transformer.h[0].attn.attention
    before = model.module(input_ids=o.ids([o.CLEAN[0]])[0][None]).logits
    result = ii.trace(model, "p = model.transformer.h[0].attn.pattern.output\n"
                             "q = model.transformer.h[0].attn.attention.q.output",
                      o.ids(o.CLEAN))
    assert result.names["p"].shape[-2:] == (o.WIDTH, o.WIDTH)
    assert result.names["q"].shape[1] == 4
    o.close(model.module(input_ids=o.ids([o.CLEAN[0]])[0][None]).logits, before, "after")
    assert getattr(attn, "_attn").__func__ is type(attn)._attn
    assert "_attn" not in vars(attn)              # no instance attribute left behind
