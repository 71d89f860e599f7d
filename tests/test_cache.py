"""ii.cache against plain hooks: every site kind, each prompt run alone, on GPT-2, NeoX and
Llama tiny models (eager and SDPA), with prompts of different lengths in one batch."""

from __future__ import annotations

import pytest
import torch

import ipy_intervene as ii
from ipy_intervene.analysis.cache import cache as make_cache
from ipy_intervene.errors import InputError, SiteError
from attention_oracle import logits_by_hand
from conftest import LAYERS, PROMPT, SHORT, checksum, hook_count

TEXTS = [PROMPT, SHORT, "Mary had", PROMPT + " the"]         # 4 different lengths
PARTS = {"gpt2": ("attn", "mlp", "ln_2", "c_proj", ("transformer", "wte")),
         "neox": ("attention", "mlp", "post_attention_layernorm", "dense", ("gpt_neox", "embed_in")),
         "llama": ("self_attn", "mlp", "post_attention_layernorm", "o_proj", ("model", "embed_tokens"))}
MODULE_SITES = ("embed", "resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "head_out")
ATTN_SITES = ("q", "k", "v", "pattern", "z", "result")


def blocks(model, arch):
    top, name = LAYERS[arch]
    return getattr(getattr(model.module, top), name)


@torch.no_grad()
def hooks_oracle(model, arch, text):
    """Every module site of one prompt, read with register_forward_(pre_)hook."""
    attn, mlp, mid, proj, (top, emb) = PARTS[arch]
    seen, handles = {}, []

    def pre(key):
        def fn(mod, args, kwargs):
            seen[key] = (args[0] if args else kwargs["hidden_states"])[0].clone()
        return fn

    def post(key):
        def fn(mod, args, out):
            seen[key] = (out[0] if isinstance(out, tuple) else out)[0].clone()
        return fn

    handles.append(getattr(getattr(model.module, top), emb).register_forward_hook(post("embed")))
    for l, block in enumerate(blocks(model, arch)):
        handles += [block.register_forward_pre_hook(pre(("resid_pre", l)), with_kwargs=True),
                    block.register_forward_hook(post(("resid_post", l))),
                    getattr(block, attn).register_forward_hook(post(("attn_out", l))),
                    getattr(block, mlp).register_forward_hook(post(("mlp_out", l))),
                    getattr(getattr(block, attn), proj).register_forward_pre_hook(
                        pre(("head_out", l)), with_kwargs=True)]
        if arch != "neox":  # tiny NeoX has a parallel residual: no resid_mid
            handles.append(getattr(block, mid).register_forward_pre_hook(
                pre(("resid_mid", l)), with_kwargs=True))
    try:
        model.module(**model.tokenizer(text, return_tensors="pt"))
    finally:
        for h in handles:
            h.remove()
    return seen


def test_module_sites_equal_plain_hooks_one_prompt_at_a_time(arch_model):
    arch, model = arch_model
    sites = [s for s in MODULE_SITES if not (arch == "neox" and s == "resid_mid")]
    before = hook_count(model.module), checksum(model.module)
    c = make_cache(model, TEXTS, sites=sites, batch_size=3)     # two chunks, padded inside
    assert (hook_count(model.module), checksum(model.module)) == before
    assert c.lengths == [len(model.to_tokens(t)[0]) for t in TEXTS]
    assert len(set(c.lengths)) == 4
    for i, text in enumerate(TEXTS):
        want = hooks_oracle(model, arch, text)
        torch.testing.assert_close(c["embed"][i], want["embed"], rtol=0, atol=1e-5)
        for site in sites[1:]:
            for layer in range(3):
                got = c[site, layer][i]
                expected = want[(site, layer)]
                if site == "head_out":
                    expected = expected.view(got.shape)
                assert got.shape[0] == c.lengths[i]
                torch.testing.assert_close(got, expected, rtol=0, atol=1e-5,
                                           msg=f"{site} {layer} prompt {i}")


def test_attention_sites_equal_attention_by_hand(attention_case):
    arch, _, model = attention_case
    c = make_cache(model, TEXTS, sites=list(ATTN_SITES), layers=[0, 2])
    impl = model.module.config._attn_implementation
    for i, text in enumerate(TEXTS):
        _, seen = logits_by_hand(model, [text])
        for layer in (0, 2):
            for site in ATTN_SITES[:-1]:
                torch.testing.assert_close(c[site, layer][i], seen[layer][site][0], rtol=0,
                                           atol=1e-5, msg=f"{site} {layer} prompt {i}")
            proj = getattr(getattr(blocks(model, arch)[layer], PARTS[arch][0]), PARTS[arch][3])
            weight = proj.weight.T if arch == "gpt2" else proj.weight   # [d_model, heads*dh]
            z = seen[layer]["z"][0]                                     # [pos, head, dh]
            by_hand = torch.stack([z[:, h] @ weight[:, h * z.shape[2]:(h + 1) * z.shape[2]].T
                                   for h in range(z.shape[1])], 1)
            torch.testing.assert_close(c["result", layer][i], by_hand, rtol=0, atol=1e-5)
    assert model.module.config._attn_implementation == impl


def test_padded_and_stack_line_up_with_the_prompts(demo):
    c = make_cache(demo, TEXTS, sites=["resid_post", "pattern"])
    x, mask = c.padded("resid_post", 2)
    assert x.shape[:2] == mask.shape == (4, max(c.lengths))
    for i, n in enumerate(c.lengths):
        assert int(mask[i].sum()) == n and bool(mask[i, -n:].all())
        assert torch.equal(x[i, -n:], c["resid_post", 2][i])
        assert bool((x[i, :-n] == 0).all())
    p, pmask = c.padded("pattern", 1)
    assert torch.equal(p[1, :, -c.lengths[1]:, -c.lengths[1]:], c["pattern", 1][1])
    feats = c.stack("resid_post", pos=-1)
    assert feats.shape == (4, 4, 128)
    assert torch.equal(feats[3, 1], c["resid_post", 1][3][-1])
    assert torch.equal(c.stack("resid_post", pos=0, layers=[-1])[:, 0],
                       torch.stack([v[0] for v in c["resid_post", 3]]))


def test_kept_positions_bound_memory_and_match(demo):
    full = make_cache(demo, TEXTS, sites="resid_post")
    last = make_cache(demo, TEXTS, sites="resid_post", positions=[0, -1], device="cpu")
    assert last.nbytes < full.nbytes
    for i in range(4):
        assert torch.equal(last["resid_post", 1][i], full["resid_post", 1][i][[0, -1]])
    assert c_sites(last) == ["resid_post"]


def c_sites(c):
    return c.sites


def test_token_ids_and_tensor_inputs(demo):
    ids = demo.to_tokens([PROMPT, PROMPT])
    c = make_cache(demo, ids, sites="mlp_out", layers=1)
    assert c.layers("mlp_out") == [1] and c.lengths == [ids.shape[1]] * 2
    assert torch.equal(c.input_ids[0], ids[0])
    assert c.str_tokens(2 - 1)[:2] == demo.to_str_tokens(PROMPT)[:2]


def test_lens_and_decompose_take_a_cache(demo):
    c = make_cache(demo, TEXTS, sites=["embed", "resid_pre", "head_out", "mlp_out", "resid_post"])
    for i in (0, 2):
        direct = ii.lens(demo, TEXTS[i])
        from_cache = ii.lens(demo, c, prompt=i)
        assert from_cache.tokens == direct.tokens
        torch.testing.assert_close(from_cache.probs, direct.probs, rtol=0, atol=1e-5)
    d = ii.decompose(demo, c, ii.logit_diff("Mary", "John"), row=0)
    want = ii.decompose(demo, TEXTS[0], ii.logit_diff("Mary", "John"))
    assert d.top(3)[0][0] == want.top(3)[0][0]
    assert abs(d.total - want.total) < 1e-4 and abs(d.actual - want.actual) < 1e-4
    small = make_cache(demo, TEXTS, sites="resid_post", layers=[1])
    with pytest.raises(SiteError, match="resid_post at layer 0 is not in this cache"):
        ii.lens(demo, small)
    with pytest.raises(SiteError, match="not in this cache"):
        ii.decompose(demo, small, ii.logit_diff("Mary", "John"))


def test_bad_requests_are_errors_and_leave_nothing(demo):
    before = hook_count(demo.module), checksum(demo.module)
    with pytest.raises(SiteError, match="unknown site"):
        make_cache(demo, TEXTS, sites=["resid_psot"])
    with pytest.raises(SiteError, match="4 layers"):
        make_cache(demo, TEXTS, layers=[4])
    with pytest.raises(InputError, match="outside prompt"):
        make_cache(demo, TEXTS, positions=[-10])
    with pytest.raises(InputError, match="prompts must be"):
        make_cache(demo, [])
    ids = demo.prepare([TEXTS[0]]).kwargs["input_ids"]
    with pytest.raises(InputError, match=r"\[batch, seq\].*shape \[1, 1, "):
        make_cache(demo, ids[None])                 # 3-D: was split into 2-D 'prompts'
    with pytest.raises(InputError, match="torch.float32 tensor"):
        make_cache(demo, ids.float())
    c = make_cache(demo, TEXTS[:1], sites="resid_post", layers=[0])
    with pytest.raises(SiteError, match="needs a layer"):
        c["resid_post"]
    with pytest.raises(SiteError, match="not in this cache"):
        c["mlp_out", 0]
    assert (hook_count(demo.module), checksum(demo.module)) == before


def test_the_default_chunk_keeps_a_chunks_values_under_the_budget(demo, monkeypatch):
    import importlib

    cache_module = importlib.import_module("ipy_intervene.analysis.cache")
    texts = [PROMPT] * 10                                       # 15 tokens each
    per_prompt = (4 * 15 + 128) * 15 * 4       # pattern [4, 15, 15] + resid_post [15, 128], fp32
    monkeypatch.setattr(cache_module, "CHUNK_BYTES", per_prompt * 3)
    rows = []
    handle = demo.module.register_forward_pre_hook(
        lambda m, args, kwargs: rows.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    try:
        c = make_cache(demo, texts, sites=["pattern", "resid_post"], layers=[1])
    finally:
        handle.remove()
    assert rows == [3, 3, 3, 1]
    whole = make_cache(demo, texts, sites=["pattern", "resid_post"], layers=[1], batch_size=10)
    for i in range(10):
        assert torch.equal(c["pattern", 1][i], whole["pattern", 1][i])


def test_stack_counts_positions_in_each_prompt_also_when_only_some_were_kept(demo):
    prompts = [PROMPT, SHORT]
    full = make_cache(demo, prompts, sites="resid_post")
    part = make_cache(demo, prompts, sites="resid_post", positions=[0, -1])
    assert torch.equal(part.stack("resid_post", pos=-1), full.stack("resid_post", pos=-1))
    assert torch.equal(part.stack("resid_post", pos=0), full.stack("resid_post", pos=0))
    with pytest.raises(InputError, match="was not kept"):
        part.stack("resid_post", pos=1)
