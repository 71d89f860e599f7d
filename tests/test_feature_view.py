"""The feature view's data (latents over prompts, top tokens) equals plain hooks run one
prompt at a time; the view has a live widget, HTML, a static SVG and text."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest
import torch

import ipy_intervene as ii
from ipy_intervene.errors import InputError, SiteError
from ipy_intervene.features.activations import feature_activations
from tests.conftest import PROMPT, SHORT, hook_count, hooks

PROMPTS = [PROMPT, SHORT, "After Tom and Amy went to the park , Tom gave the ball to"]
SVG = "{http://www.w3.org/2000/svg}"


@pytest.fixture
def spliced(demo):
    before = hook_count(demo.module)
    splice = ii.attach(demo, demo.transformer.h[2], ii.load_sae("demo"))
    yield demo, splice, before
    ii.detach(demo)


def oracle(model, splice, prompt):
    seen = []
    ids = model.tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad(), hooks((splice.latents, lambda m, a, o: seen.append(o))):
        model.module(ids)
    return seen[0][0]


def test_latents_over_prompts_equal_plain_hooks(spliced):
    model, splice, before = spliced
    acts = feature_activations(model, model.transformer.h[2].sae, PROMPTS)
    assert hook_count(model.module) > before  # the splice's own hook only
    assert acts.site == "transformer.h[2].sae" and len(acts.latents) == 512
    for i, prompt in enumerate(PROMPTS):
        want = oracle(model, splice, prompt)
        torch.testing.assert_close(acts.of_prompt(i), want, atol=1e-5, rtol=1e-5)
        assert acts.tokens[i] == model.to_str_tokens(prompt)
        assert not acts.acts[i, : acts.acts.shape[1] - len(want)].any()  # padding is zero


def test_top_tokens_are_the_largest_activations(spliced):
    model, splice, _ = spliced
    acts = feature_activations(model, splice, PROMPTS, latents=[468, 43, 7])
    assert acts.latents == [468, 43, 7]
    everything = [(float(oracle(model, splice, p)[pos, 468]), i, pos)
                  for i, p in enumerate(PROMPTS) for pos in range(len(model.to_str_tokens(p)))]
    want = sorted((v for v in everything if v[0] > 0), reverse=True)[:4]
    got = acts.top_tokens(468, k=4)
    assert [round(t.value, 4) for t in got] == [round(v[0], 4) for v in want]
    for t in got:
        assert t.token == model.to_str_tokens(PROMPTS[t.prompt])[t.pos]
        assert t.context.endswith(f"[{t.token.strip()}]")
    with pytest.raises(InputError, match="latent 5 was not recorded"):
        acts.top_tokens(5)


def test_the_view_has_widget_html_svg_and_text(spliced):
    model, splice, _ = spliced
    acts = feature_activations(model, splice, PROMPTS)
    view = acts.show(latent=468, prompt=1)
    bundle = view._repr_mimebundle_()
    assert {"application/vnd.jupyter.widget-view+json", "text/html", "image/svg+xml",
            "text/plain"} <= set(bundle)
    root = ET.fromstring(bundle["image/svg+xml"])
    marks = [e for e in root.iter() if e.tag in (f"{SVG}rect", f"{SVG}path")]
    words = ["".join(e.itertext()) for e in root.iter(f"{SVG}text")]
    assert len(marks) > 20 and any("latent 468" in w for w in words)
    assert "latent 468" in bundle["text/plain"]
    heat = view.figure.data[1]
    assert list(heat.y)[0] == "latent 468" or "latent 468" in heat.y
    view.latent.value = 43
    view.prompt.value = 2
    assert "latent 43" in view.figure.data[1].y and len(view.figure.data[1].x) == len(
        model.to_str_tokens(PROMPTS[2]))
    assert "latent 43" in view.text()


def test_bad_requests_are_clear_and_leave_no_hook(spliced):
    model, splice, _ = spliced
    hooks_now = hook_count(model.module)
    with pytest.raises(InputError, match="out of range"):
        feature_activations(model, splice, PROMPTS, latents=[600])
    with pytest.raises(SiteError, match="not a spliced dictionary"):
        feature_activations(model, model.transformer.h[1], PROMPTS)
    with pytest.raises(InputError, match="prompt"):
        feature_activations(model, splice, [])
    assert hook_count(model.module) == hooks_now
