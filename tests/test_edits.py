"""Edits that last (issue 30): every site kind against plain hooks written by hand, one
prompt at a time, for a batch of prompts of different lengths (left padding): logits,
greedy generations, ``ii.cache`` and ``ii.patch_sweep``; the original model never changes."""

from __future__ import annotations

import pytest
import torch

import ipy_intervene as ii
from ipy_intervene.errors import InterventionError
from conftest import CORRUPT, PROMPT, SHORT, checksum, hook_count

PROMPTS = [PROMPT, SHORT, "When John went to the store , Mary gave"]
TOL = 1e-5
SITES = ["resid_post", "mlp_out", "attn_out"]


def ids(model, text):
    return model.tokenizer(text, return_tensors="pt").input_ids


def d_head(model) -> int:
    return model.config.n_embd // model.config.n_head


def zero_head(h: int, width: int):
    def pre(mod, args):
        x = args[0].clone()
        x[..., h * width:(h + 1) * width] = 0
        return (x, *args[1:])
    return pre


def edit_out(fn):
    def post(mod, args, out):
        if isinstance(out, tuple):
            first = out[0].clone()
            fn(first)
            return (first, *out[1:])
        out = out.clone()
        fn(out)
        return out
    return post


@pytest.fixture(scope="module")
def vec():
    torch.manual_seed(3)
    return torch.randn(128)


def kinds(model, vec):
    """(cell, [(module, 'post'|'pre', hand hook)]) for each site kind."""
    h = model.module.transformer.h
    w = d_head(model)

    def steer(x):
        x[:, -1] += 3 * vec

    def half_last(x):
        x[:, -1] *= 0.5

    return {
        "block": ("model.transformer.h[1].output[:, -1] += 3 * vec",
                  [(h[1], "post", edit_out(steer))]),
        "attention": ("model.transformer.h[2].attn.output[0][:, -1] *= 0.5",
                      [(h[2].attn, "post", edit_out(half_last))]),
        "mlp": ("model.transformer.h[2].mlp.output[:] = 0",
                [(h[2].mlp, "post", edit_out(lambda x: x.zero_()))]),
        "head": ("model.transformer.h[3].attn.c_proj.input[:, :, 32:64] = 0",
                 [(h[3].attn.c_proj, "pre", zero_head(1, w))]),
        "pattern": ("model.transformer.h[1].attn.pattern.output[:, 2] = 0",
                    [(h[1].attn.c_proj, "pre", zero_head(2, w))]),
    }


class Hand:
    """Plain hooks on the original model, removed on exit."""

    def __init__(self, hooks):
        self.hooks, self.handles = list(hooks), []

    def __enter__(self):
        for module, kind, fn in self.hooks:
            register = module.register_forward_hook if kind == "post" else \
                module.register_forward_pre_hook
            self.handles.append(register(fn))
        return self

    def __exit__(self, *exc):
        while self.handles:
            self.handles.pop().remove()


def alone(model, hand, text):
    with Hand(hand), torch.no_grad():
        return model.module(ids(model, text)).logits[0]


def assert_rows_match(model, batched, hand):
    for i, text in enumerate(PROMPTS):
        ref = alone(model, hand, text)
        # a padded batch changes float order: 1e-5 relative (logits are ~20)
        torch.testing.assert_close(batched[i, -ref.shape[0]:], ref, atol=TOL, rtol=TOL)


@pytest.mark.parametrize("kind", ["block", "attention", "mlp", "head", "pattern"])
def test_each_site_kind_equals_hand_hooks_per_prompt_and_the_original_is_unchanged(demo, vec,
                                                                                     kind):
    cell, hand = kinds(demo, vec)[kind]
    batch = demo.prepare(PROMPTS)
    with torch.no_grad():
        before = demo.module(**batch.kwargs).logits
    weights, hooked = checksum(demo.module), hook_count(demo.module)
    edited = ii.edit(demo, cell, name=kind, namespace={"vec": vec})
    with torch.no_grad():
        out = edited.module(**batch.kwargs).logits
        after = demo.module(**batch.kwargs).logits
    assert_rows_match(demo, out, hand)
    assert (out - before).abs().max() > 1e-3           # the edit matters
    assert torch.equal(after, before) and checksum(demo.module) == weights
    assert hook_count(demo.module) == hooked and ii.edits(demo) == []
    assert all(a.data_ptr() == b.data_ptr() for a, b in
               zip(edited.module.parameters(), demo.module.parameters()))
    ii.clear_edits(edited)
    assert hook_count(edited.module) == 0


def test_a_latent_of_a_splice_equals_hand_hooks(demo):
    splice = ii.attach(demo, demo.transformer.h[2], ii.load_sae("demo"))
    try:
        edited = ii.edit(demo, "model.transformer.h[2].sae.latents.output[:, -1, 5] = 0",
                         name="latent")
        with torch.no_grad():
            out = edited.module(**demo.prepare(PROMPTS).kwargs).logits

        def zero(x):
            x[:, -1, 5] = 0
        assert_rows_match(demo, out, [(splice.latents, "post", edit_out(zero))])
        ii.clear_edits(edited)
    finally:
        ii.detach(demo)


def test_steering_every_generation_step_equals_hand_hooks_and_the_pipeline(demo, vec):
    cell = "for step in tracer.steps():\n    model.transformer.h[1].output[:, -1] += 20 * vec"
    steered = ii.edit(demo, cell, name="steer", namespace={"vec": vec})
    batch = demo.prepare(PROMPTS)
    with torch.no_grad():
        out = steered.module.generate(**batch.kwargs, max_new_tokens=4, min_new_tokens=4,
                                      do_sample=False, pad_token_id=demo.pad_id)
    hand = kinds(demo, 20 / 3 * vec)["block"][1]
    for i, text in enumerate(PROMPTS):
        prompt = ids(demo, text)
        with Hand(hand), torch.no_grad():
            ref = demo.module.generate(prompt, attention_mask=torch.ones_like(prompt),
                                       max_new_tokens=4, min_new_tokens=4, do_sample=False,
                                       pad_token_id=demo.pad_id)
        assert out[i, -4:].tolist() == ref[0, -4:].tolist()
    from transformers import pipeline

    pipe = pipeline("text-generation", model=steered.module, tokenizer=demo.tokenizer)
    text = pipe(PROMPT, max_new_tokens=4, do_sample=False)[0]["generated_text"]
    with Hand(hand):
        plain = pipeline("text-generation", model=demo.module, tokenizer=demo.tokenizer)
        expected = plain(PROMPT, max_new_tokens=4, do_sample=False)[0]["generated_text"]
    unsteered = plain(PROMPT, max_new_tokens=4, do_sample=False)[0]["generated_text"]
    assert text == expected != unsteered


def test_an_edit_outside_the_steps_loop_applies_at_the_prompt_only(demo, vec):
    edited = ii.edit(demo, "model.transformer.h[1].output[:, -1] += 3 * vec", name="once",
                     namespace={"vec": vec})
    prompt = ids(demo, PROMPT)
    with torch.no_grad():
        out = edited.module.generate(prompt, attention_mask=torch.ones_like(prompt),
                                     max_new_tokens=3, min_new_tokens=3, do_sample=False,
                                     pad_token_id=demo.pad_id)
    seen = []

    def once(mod, args, output):   # the hand oracle: the prompt's forward only
        if not seen:
            seen.append(1)
            output = output.clone()
            output[:, -1] += 3 * vec
            return output
    with Hand([(demo.module.transformer.h[1], "post", once)]), torch.no_grad():
        ref = demo.module.generate(prompt, attention_mask=torch.ones_like(prompt),
                                   max_new_tokens=3, min_new_tokens=3, do_sample=False,
                                   pad_token_id=demo.pad_id)
    assert out.tolist() == ref.tolist()


@pytest.mark.parametrize("kind", ["block", "head", "mlp"])
def test_cache_and_sweep_of_the_edited_model_equal_the_hand_hooked_model(demo, vec, kind):
    cell, hand = kinds(demo, vec)[kind]
    edited = ii.edit(demo, cell, name=kind, namespace={"vec": vec})
    metric = ii.logit_diff("Mary", "John")
    got = ii.patch_sweep(edited, PROMPT, CORRUPT, metric, site="resid_pre")
    cached = ii.cache(edited, PROMPTS, sites=SITES)
    original = ii.patch_sweep(demo, PROMPT, CORRUPT, metric, site="resid_pre")
    with Hand(hand):
        want = ii.patch_sweep(demo, PROMPT, CORRUPT, metric, site="resid_pre")
        want_cache = ii.cache(demo, PROMPTS, sites=SITES)
    torch.testing.assert_close(got.raw, want.raw, atol=TOL, rtol=0)
    assert not got.extra.get("reused") and (got.raw - original.raw).abs().max() > 1e-3
    for name in SITES:
        for layer in range(4):
            torch.testing.assert_close(cached[name, layer], want_cache[name, layer], atol=TOL,
                                       rtol=0)
    ii.clear_edits(edited)


def test_the_memo_keys_each_edit_set_in_place_and_clearing_gives_the_original_back(demo, vec,
                                                                                    monkeypatch):
    from ipy_intervene.sweep import memo

    monkeypatch.setattr(memo, "MIN_SECONDS", 0.0)
    memo.forget()
    module = ii.wrap(demo.module.__class__(demo.config).eval(), demo.tokenizer)
    module.module.load_state_dict(demo.module.state_dict())
    metric = ii.logit_diff("Mary", "John")
    first = ii.patch_sweep(module, PROMPT, CORRUPT, metric)
    ii.edit(module, kinds(module, vec)["mlp"][0], name="no_mlp", inplace=True)
    edited = ii.patch_sweep(module, PROMPT, CORRUPT, metric)
    assert not edited.extra.get("reused") and (edited.raw - first.raw).abs().max() > 1e-3
    again = ii.patch_sweep(module, PROMPT, CORRUPT, metric)
    assert again.extra.get("reused") and torch.equal(again.raw, edited.raw)
    ii.clear_edits(module)
    assert hook_count(module.module) == 0
    back = ii.patch_sweep(module, PROMPT, CORRUPT, metric)
    assert torch.equal(back.raw, first.raw)
    memo.forget()


def test_gradients_flow_through_a_differentiable_edit(demo):
    edited = ii.edit(demo, "model.transformer.h[1].output[:, -1] *= 0.5", name="half")
    prompt = ids(demo, PROMPT)
    loss = edited.module(prompt, labels=prompt).loss
    loss.backward()
    grads = [p.grad.clone() for p in demo.module.parameters()]
    demo.module.zero_grad(set_to_none=True)

    def half(x):
        x[:, -1] *= 0.5
    with Hand([(demo.module.transformer.h[1], "post", edit_out(half))]):
        demo.module(prompt, labels=prompt).loss.backward()
    for got, want in zip(grads, demo.module.parameters()):
        torch.testing.assert_close(got, want.grad, atol=TOL, rtol=0)
    demo.module.zero_grad(set_to_none=True)


def test_edits_compose_in_order_and_a_trace_on_the_edited_model_runs_after_them(demo, vec):
    first = ii.edit(demo, "model.transformer.h[1].output[:, -1] += 3 * vec", name="steer",
                    namespace={"vec": vec})
    both = ii.edit(first, "model.transformer.h[2].mlp.output[:] = 0", name="no_mlp")
    assert [e.name for e in ii.edits(both)] == ["steer", "no_mlp"]
    assert [e.name for e in ii.edits(first)] == ["steer"]
    ns = {}
    ii.trace(both, "h = model.transformer.h[1].output\nlogits = model.lm_head.output", PROMPT,
             namespace=ns)
    k = kinds(demo, vec)
    ref = alone(demo, k["block"][1] + k["mlp"][1], PROMPT)
    torch.testing.assert_close(ns["logits"][0], ref, atol=TOL, rtol=0)
    seen = {}                  # block 2's input: block 1's output after the hand hook
    grab = demo.module.transformer.h[2].register_forward_pre_hook(
        lambda m, args: seen.__setitem__("h", args[0].clone()))
    try:
        with Hand(k["block"][1]), torch.no_grad():
            demo.module(ids(demo, PROMPT))
    finally:
        grab.remove()
    h = seen["h"]
    torch.testing.assert_close(ns["h"], h, atol=TOL, rtol=0)
    again = ii.edit(demo, "model.transformer.h[1].output[:, -1] += 3 * vec", name="steer",
                    namespace={"vec": vec})   # made after transformers hooked the original
    with torch.no_grad():
        hidden = again.module(ids(demo, PROMPT), output_hidden_states=True).hidden_states[2]
    torch.testing.assert_close(hidden, h, atol=TOL, rtol=0)


def test_values_are_captured_when_the_edit_is_made(demo):
    vec = torch.ones(128)
    edited = ii.edit(demo, "model.transformer.h[1].output[:, -1] += vec", name="v",
                     namespace={"vec": vec})
    with torch.no_grad():
        before = edited.module(ids(demo, PROMPT)).logits
        vec *= 5
        after = edited.module(ids(demo, PROMPT)).logits
    assert torch.equal(before, after)
    assert torch.equal(ii.edits(edited)[0].captured["vec"], torch.ones(128))


def test_a_failing_edit_creates_nothing(demo):
    weights, hooked = checksum(demo.module), hook_count(demo.module)
    with pytest.raises(InterventionError, match="transformer.h"):
        ii.edit(demo, "model.transformer.h[9].output[:] = 0", name="bad", inplace=True)
    with pytest.raises(InterventionError, match="line 2"):
        ii.edit(demo, "x = 1\nmodel.transformer.h[1].output[:, 40] = 0", name="bad",
                inplace=True, input=PROMPT)
    assert hook_count(demo.module) == hooked and ii.edits(demo) == []
    assert checksum(demo.module) == weights


def test_an_edit_that_fails_later_names_its_line_and_a_cross_prompt_edit_is_refused(demo):
    edited = ii.edit(demo, "x = 1\nmodel.transformer.h[1].output[:, 14] = 0", name="late")
    with torch.no_grad():
        edited.module(ids(demo, PROMPT))                      # 15 tokens: fine
        with pytest.raises(InterventionError, match="line 2") as info:
            edited.module(ids(demo, SHORT))
    assert "late" in "\n".join(getattr(info.value, "__notes__", []))
    with torch.no_grad():
        edited.module(ids(demo, PROMPT))                      # the edit still works after it
    cell = "with tracer.invoke('a'):\n    h = model.transformer.h[1].output"
    with pytest.raises(InterventionError, match="no other prompt"):
        ii.edit(demo, cell, name="cross")


def test_the_clone_follows_the_original_and_refuses_its_own_conversion(demo):
    edited = ii.edit(demo, "model.transformer.h[2].mlp.output[:] = 0", name="z")
    with pytest.raises(InterventionError, match="Convert the original"):
        edited.module.double()
    edited.module.to(torch.float32)                           # a no-op passes
    demo.module.double()
    try:
        with torch.no_grad():
            out = edited.module(ids(demo, PROMPT)).logits
        assert out.dtype == torch.float64
        assert all(b.dtype == torch.float64 for b in edited.module.buffers()
                   if b.is_floating_point())
    finally:
        demo.module.float()


def test_the_magic_makes_an_edit_and_a_failing_one_binds_nothing(shell, vec):
    shell.user_ns["vec"] = vec
    hooked = hook_count(shell.user_ns["model"].module)
    shell.run_cell_magic("trace", "model --edit steered",
                         "model.transformer.h[1].output[:, -1] += 3 * vec")
    steered = shell.user_ns["steered"]
    assert [e.name for e in ii.edits(steered)] == ["steered"] and ii.edits(shell.user_ns["model"]) == []
    with pytest.raises(InterventionError):
        shell.run_cell_magic("trace", "model --edit broken", "model.transformer.h[7].output[:] = 0")
    assert "broken" not in shell.user_ns
    shell.run_cell_magic("trace", "model --edit no_mlp --inplace",
                         "model.transformer.h[2].mlp.output[:] = 0")
    model = shell.user_ns["model"]
    assert shell.user_ns["no_mlp"] is model and len(ii.edits(model)) == 1
    ii.clear_edits(model)
    assert hook_count(model.module) == hooked


def test_a_forward_interrupted_by_ctrl_c_leaves_the_next_forward_edited(demo, vec):
    """torch does not call the end hook of a forward a KeyboardInterrupt leaves: the next
    forward must still start its own run (it used to be served the interrupted one's,
    finished, and ran unedited)."""
    cell, hand = kinds(demo, vec)["block"]
    steered = ii.edit(demo, cell, name="steer", namespace={"vec": vec})

    def interrupt(m, args, out):
        raise KeyboardInterrupt

    handle = steered.module.transformer.ln_f.register_forward_hook(interrupt)
    try:
        with pytest.raises(KeyboardInterrupt), torch.no_grad():
            steered.module(ids(demo, PROMPT))
    finally:
        handle.remove()
    with torch.no_grad():
        out = steered.module(ids(demo, PROMPT)).logits[0]
        generated = steered.module.generate(ids(demo, SHORT), max_new_tokens=3,
                                            do_sample=False, pad_token_id=demo.pad_id)
    torch.testing.assert_close(out, alone(demo, hand, PROMPT), atol=TOL, rtol=TOL)
    fresh = ii.edit(demo, cell, name="steer", namespace={"vec": vec})   # never interrupted
    with torch.no_grad():
        want = fresh.module.generate(ids(demo, SHORT), max_new_tokens=3, do_sample=False,
                                     pad_token_id=demo.pad_id)
    assert generated.tolist() == want.tolist()


def test_clearing_a_pattern_edit_leaves_nothing_on_gpt_neo_s_attention(demo):
    """GPT-Neo's pattern site wraps its attention's own ``_attn`` method for as long as the
    edit lasts; clearing the edit leaves no instance attribute behind."""
    from test_families_maps import family

    model = family("gpt_neo", demo)
    attn = model.module.transformer.h[0].attn.attention
    edited = ii.edit(model, "model.transformer.h[0].attn.attention.pattern.output[:, 1] = 0",
                     name="no_head1", inplace=True)
    assert "_attn" in vars(attn)
    ii.clear_edits(edited)
    assert "_attn" not in vars(attn) and hook_count(model.module) == 0
