"""The families added to the site table for issue 29 (post-norms, multipliers, logit transforms,
parallel blocks that return tuples, MoE, MLA): each map passes its self-check; on a padded batch
of prompts of different lengths, the cached resid/attn_out/mlp_out sites equal plain hooks run
one prompt at a time and add up to the residual stream as the family adds them; the lens at
the last layer is the model's own distribution; decompose's parts sum to the logit difference
(before Gemma's soft-cap); a resid_pre sweep equals one prompt at a time. fp32, 1e-5."""

from __future__ import annotations

import pytest
import torch

import ipy_intervene as ii
from ipy_intervene.arch.sites import adapter_for, get_path
from ipy_intervene.errors import SiteError

from test_families import BAD, CLEAN, CORRUPT, GOOD, build, ids, run_alone

MOE = dict(num_local_experts=4, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
           n_routed_experts=4)
# name -> (model_type, config extras, adapter fields the table must give)
FAMILIES = {
    "gemma": ("gemma", {}, dict(post_attn_norm=None)),
    "gemma2": ("gemma2", dict(final_logit_softcapping=5.0),
               dict(post_attn_norm="post_attention_layernorm", logit_softcap=5.0,
                    mid_norm="pre_feedforward_layernorm")),
    "gemma3_text": ("gemma3_text", dict(final_logit_softcapping=5.0),
                    dict(post_mlp_norm="post_feedforward_layernorm", logit_softcap=5.0)),
    "olmo2": ("olmo2", {}, dict(post_attn_norm="post_attention_layernorm", mid_norm="mlp",
                                attn_norm=None)),
    "olmo3": ("olmo3", {}, dict(post_mlp_norm="post_feedforward_layernorm", mid_norm="mlp")),
    "granite": ("granite", dict(residual_multiplier=0.5, embedding_multiplier=2.0,
                                logits_scaling=4.0),
                dict(residual_multiplier=0.5, embed_scale=2.0, logit_scale=0.25)),
    "cohere": ("cohere", dict(logit_scale=0.5), dict(mid_norm=None, logit_scale=0.5)),
    "cohere2": ("cohere2", dict(logit_scale=0.5), dict(mid_norm=None, logit_scale=0.5)),
    "phi": ("phi", dict(partial_rotary_factor=0.5), dict(mid_norm=None,
                                                         head_proj="self_attn.dense")),
    "olmoe": ("olmoe", MOE, dict(mid_norm="post_attention_layernorm")),
    "gpt_neo": ("gpt_neo", dict(num_layers=2, num_heads=4, window_size=4,
                                attention_types=[[["global", "local"], 1]]),
                dict(head_proj="attn.attention.out_proj")),
    "falcon": ("falcon", {}, dict(mid_norm=None, attn_norm="input_layernorm")),
    "falcon-new": ("falcon", dict(new_decoder_architecture=True, num_kv_heads=2),
                   dict(mid_norm=None, attn_norm="ln_attn", mlp_norm="ln_mlp")),
    "falcon-serial": ("falcon", dict(parallel_attn=False, multi_query=False),
                      dict(mid_norm="post_attention_layernorm", qkv_layout="per_head")),
    "gpt_oss": ("gpt_oss", dict(MOE, head_dim=8), dict(mid_norm="post_attention_layernorm")),
    "deepseek_v3": ("deepseek_v3", dict(MOE, num_key_value_heads=4, first_k_dense_replace=1, kv_lora_rank=8,
                                        q_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4,
                                        v_head_dim=8, n_group=1, topk_group=1), dict(qkv=None)),
    # not in the table: discovered from the module tree and config, then self-checked
    "gemma4_text": ("gemma4_text", dict(hidden_size_per_layer_input=0, num_kv_shared_layers=0,
                                        head_dim=8, global_head_dim=8,
                                        final_logit_softcapping=5.0),
                    dict(post_attn_norm="post_attention_layernorm", logit_softcap=5.0)),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, demo):
    name = request.param
    model_type, extra, _ = FAMILIES[name]
    return name, ii.wrap(build(model_type, len(demo.tokenizer), **extra), demo.tokenizer)


def present(adapter, site: str) -> bool:
    """Whether ``site`` exists on this map (refused sites raise on lookup)."""
    try:
        adapter.site_path(site, 0)
    except ii.SiteError if hasattr(ii, "SiteError") else Exception:
        return False
    return True


def plain_sites(module, adapter, prompt):
    """One prompt alone, plain hooks: each block's input, output, and what its sublayers'
    modules (post-norms where the family has them) output."""
    seen, handles = {}, []
    blocks = get_path(module, adapter.blocks)

    def keep(key):
        def fn(m, args, out):
            out = out[0] if isinstance(out, tuple) else out
            seen[key] = out.detach().clone()
        return fn
    for l, block in enumerate(blocks):
        handles.append(block.register_forward_pre_hook(
            lambda m, a, kw, l=l: seen.__setitem__(("resid_pre", l), (a[0] if a else
                                                                       kw["hidden_states"]).clone()),
            with_kwargs=True))
        handles.append(block.register_forward_hook(keep(("resid_post", l))))
        for part in ("attn", "mlp"):
            handles.append(get_path(block, adapter.writer(part)).register_forward_hook(
                keep((f"{part}_w", l))))
    try:
        with torch.no_grad():
            logits = module(input_ids=torch.tensor([prompt])).logits
    finally:
        for h in handles:
            h.remove()
    return seen, logits


def test_the_family_map_passes_its_self_check_with_the_family_s_fields(family):
    name, model = family
    adapter = adapter_for(model)
    assert adapter.name == FAMILIES[name][0] and adapter.n_layers == 2
    for field, value in FAMILIES[name][2].items():
        assert getattr(adapter, field) == value, (name, field)


def test_cached_sites_equal_one_prompt_at_a_time_and_add_up_as_the_family_adds_them(family):
    name, model = family
    adapter = adapter_for(model)
    sites = [s for s in ("resid_pre", "resid_post", "attn_out", "mlp_out") if present(adapter, s)]
    cache = ii.cache(model, ids(CLEAN), sites=sites)
    r = adapter.residual_multiplier
    for i, prompt in enumerate(CLEAN):
        want, _ = plain_sites(model.module, adapter, prompt)
        for layer in range(2):
            for site in sites:
                key = {"attn_out": "attn_w", "mlp_out": "mlp_w"}.get(site, site)
                torch.testing.assert_close(cache[site, layer][i], want[key, layer][0],
                                           atol=1e-5, rtol=0, msg=f"{name} {site} {layer}")
            added = r * (want["attn_w", layer] + want["mlp_w", layer])
            torch.testing.assert_close(want["resid_pre", layer] + added,
                                       want["resid_post", layer], atol=1e-5, rtol=1e-5)


def test_the_lens_at_the_last_layer_is_the_model_s_distribution(family):
    name, model = family
    prompt = CLEAN[0]
    lens = ii.lens(model, torch.tensor(prompt))
    with torch.no_grad():
        logits = model.module(input_ids=torch.tensor([prompt])).logits[0]
    torch.testing.assert_close(lens.probs[-1], logits.float().softmax(-1), atol=1e-6, rtol=1e-5)


def test_decompose_parts_sum_to_the_logit_difference(family):
    name, model = family
    adapter = adapter_for(model)
    prompt = CLEAN[1]
    if adapter.unsummed("decompose"):   # Gemma 4: a late writer and a scale on the stream
        with pytest.raises(SiteError, match=f"decompose reads the residual stream as the sum "
                                            f"of .* but a {name} block also has"):
            ii.decompose(model, torch.tensor(prompt), ii.logit_diff(GOOD, BAD))
        return
    d = ii.decompose(model, torch.tensor(prompt), ii.logit_diff(GOOD, BAD))
    logits, _, post = run_alone(model.module, adapter, prompt)
    if adapter.logit_softcap is None:
        want = float(logits[0, -1, GOOD] - logits[0, -1, BAD])
        assert "before the cap" not in d.note
    else:                             # DLA is defined before the cap: the plain pre-cap logits
        with torch.no_grad():
            raw = model.module.lm_head(get_path(model.module, adapter.final_norm)(post[1]))
        want = float(raw[0, -1, GOOD] - raw[0, -1, BAD])
        assert "before the cap" in d.note
    assert d.actual == pytest.approx(want, abs=1e-5)
    assert d.total == pytest.approx(d.actual, abs=1e-4)
    assert torch.isnan(d.heads).all() == (adapter.post_attn_norm is not None)


def test_a_resid_pre_sweep_equals_one_prompt_at_a_time(family):
    name, model = family
    adapter = adapter_for(model)
    got = ii.patch_sweep(model, ids(CLEAN), ids(CORRUPT), ii.logit_diff(GOOD, BAD),
                         site="resid_pre").per_prompt
    width = max(len(p) for p in CLEAN)
    for i, (clean, corrupt) in enumerate(zip(CLEAN, CORRUPT)):
        pad = width - len(clean)
        _, clean_pre, _ = run_alone(model.module, adapter, clean)
        for layer in range(2):
            for p in range(pad, width, 2):
                logits, _, _ = run_alone(model.module, adapter, corrupt,
                                         (layer, p - pad, clean_pre[layer][0, p - pad]))
                expected = float(logits[0, -1, GOOD] - logits[0, -1, BAD])
                assert float(got[layer, p, i]) == pytest.approx(expected, abs=1e-5), \
                    (name, i, layer, p)
