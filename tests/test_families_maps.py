"""Where a family's sites do not exist or a method has no meaning, a clear error naming the
family, the site and why; a map set on the model by hand is the one every analysis reads; a
family the table lacks is discovered from its module tree and config, or refused with the
``ii.Adapter(...)`` line."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import ipy_intervene as ii
from ipy_intervene.arch import families
from ipy_intervene.arch.sites import adapter_for
from ipy_intervene.circuit.graph import build_graph
from ipy_intervene.errors import SiteError

from conftest import tiny_model
from test_families import BAD, CLEAN, CORRUPT, GOOD, LLAMA_MAP, build, ids
from test_families_more import FAMILIES


def family(name: str, demo) -> ii.Model:
    model_type, extra, _ = FAMILIES[name]
    return ii.wrap(build(model_type, len(demo.tokenizer), **extra), demo.tokenizer)


# -- sites that do not exist, methods that have no meaning ---------------------------------------


def test_granite_s_attn_out_is_refused_because_the_block_scales_what_it_adds(demo):
    model = family("granite", demo)
    with pytest.raises(SiteError, match=r"site `attn_out` does not exist in granite models with "
                                        r"residual_multiplier=0.5: the block adds 0.5 times"):
        ii.cache(model, ids(CLEAN), sites=["attn_out"])
    with pytest.raises(SiteError, match=r"site `mlp_out` does not exist in granite"):
        ii.patch_sweep(model, ids(CLEAN), ids(CORRUPT), ii.logit_diff(GOOD, BAD), site="mlp_out")


def test_parallel_falcon_s_mlp_out_is_refused_because_it_is_added_to_in_place(demo):
    model = family("falcon", demo)
    with pytest.raises(SiteError, match=r"site `mlp_out` does not exist in falcon models: Falcon "
                                        r"adds attention's output into the MLP's output tensor "
                                        r"in place"):
        ii.cache(model, ids(CLEAN), sites=["mlp_out"])
    assert adapter_for(family("falcon-serial", demo)).refused == ()


def test_a_map_that_misses_an_in_place_add_fails_the_check(demo):
    model = family("falcon", demo)
    blind = replace(adapter_for(model), refused=())
    with pytest.raises(SiteError, match=r"the tensor of mlp_out is changed in place after its "
                                        r"module returns it .*refused=\(\('mlp_out', '<why>'\),\)"):
        adapter_for(model, blind)


@pytest.mark.parametrize("name", ["gemma2", "olmo2"])
def test_edge_attribution_on_a_post_norm_family_sends_from_the_whole_attention_write(demo,
                                                                                   name):
    """A norm after attention mixes the heads: the sender is the layer's attention write
    (tests/test_edges_postnorm.py checks its scores against plain hooks)."""
    graph = build_graph(family(name, demo))
    assert [n.name for n in graph.senders] == ["embed", "ATTN0", "MLP0", "ATTN1", "MLP1"]


def test_edge_attribution_on_granite_says_the_scores_would_be_off_by_its_multipliers(demo):
    with pytest.raises(SiteError, match=r"granite scales what it adds \(residual_multiplier=0.5, "
                                        r"embed_scale=2\)"):
        build_graph(family("granite", demo))


def test_a_map_without_the_family_s_logit_scale_fails_the_check(demo):
    model = family("cohere", demo)
    with pytest.raises(SiteError, match=r"the map's logit transform \(logit_scale=1, "
                                        r"logit_softcap=None\) is not the model's logits"):
        adapter_for(model, replace(adapter_for(model), logit_scale=1.0))


# -- a map by hand, set once on the model ---------------------------------------------------------


def test_a_map_set_on_the_model_is_the_one_every_analysis_reads(demo):
    module = tiny_model("llama", len(demo.tokenizer))
    mine = ii.Adapter("mine", **LLAMA_MAP)
    model = ii.wrap(module, demo.tokenizer, adapter=mine)
    assert adapter_for(model).name == "mine" and model.adapter.name == "mine"
    assert adapter_for(ii.wrap(module, demo.tokenizer)).name == "mine"   # kept on the module
    prompt = torch.tensor(CLEAN[0])
    lens = ii.lens(model, prompt)
    d = ii.decompose(model, prompt, ii.logit_diff(GOOD, BAD))
    patterns = ii.attention_patterns(model, prompt)
    model.adapter = None                                   # back to the family's map
    assert model.adapter.name == "llama"
    torch.testing.assert_close(lens.probs, ii.lens(model, prompt).probs)
    assert d.total == pytest.approx(ii.decompose(model, prompt, ii.logit_diff(GOOD, BAD)).total)
    assert patterns is not None


def test_a_wrong_map_set_on_the_model_is_refused_at_once(demo):
    module = tiny_model("llama", len(demo.tokenizer))
    wrong = ii.Adapter("mine", **{**LLAMA_MAP, "mid_norm": "input_layernorm"})
    with pytest.raises(SiteError, match=r"the site map of 'mine' fails its check"):
        ii.wrap(module, demo.tokenizer, adapter=wrong)
    model = ii.wrap(module, demo.tokenizer)
    with pytest.raises(SiteError, match=r"the site map of 'mine' fails its check"):
        model.adapter = wrong
    assert model.adapter.name == "llama"


# -- discovery -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["llama", "gemma2", "olmo2", "cohere", "granite", "gpt_neo"])
def test_a_family_removed_from_the_table_is_discovered_as_the_table_maps_it(demo, monkeypatch,
                                                                           name):
    from test_families_more import FAMILIES as MORE

    model_type, extra, _ = MORE.get(name, (name, {}, {}))
    module = build(model_type, len(demo.tokenizer), **extra)
    table = adapter_for(module)
    monkeypatch.delitem(families.FAMILIES, model_type)
    fresh = build(model_type, len(demo.tokenizer), **extra)
    found = adapter_for(fresh)
    same = ("blocks", "final_norm", "unembed", "embed", "attn", "mlp", "mid_norm", "head_proj",
            "n_heads", "post_attn_norm", "post_mlp_norm", "embed_scale", "residual_multiplier",
            "logit_scale", "logit_softcap", "attn_norm")
    assert {f: getattr(found, f) for f in same} == {f: getattr(table, f) for f in same}
    model = ii.wrap(fresh, demo.tokenizer)
    got = ii.patch_sweep(model, ids(CLEAN), ids(CORRUPT), ii.logit_diff(GOOD, BAD),
                         site="resid_pre", adapter=table).per_prompt
    torch.testing.assert_close(ii.patch_sweep(model, ids(CLEAN), ids(CORRUPT),
                                              ii.logit_diff(GOOD, BAD),
                                              site="resid_pre").per_prompt, got)


def test_a_discovered_map_that_fails_its_check_is_refused_with_the_line_to_edit(demo,
                                                                               monkeypatch):
    monkeypatch.delitem(families.FAMILIES, "llama")
    module = tiny_model("llama", len(demo.tokenizer))
    for block in module.model.layers:             # the block adds something no module outputs
        forward = block.forward
        block.forward = lambda *a, forward=forward, **k: forward(*a, **k) + 1.0
    with pytest.raises(SiteError, match=r"the architecture 'llama' is not in the family table; "
                                        r"the map read off its module tree fails its check .*"
                                        r"Edit this line .*ii.Adapter\('llama', "
                                        r"blocks='model.layers'"):
        adapter_for(module)


def test_a_module_tree_discovery_cannot_read_is_refused_with_what_is_missing(demo):
    class Config:
        model_type, num_hidden_layers = "mystery", 2

    module = torch.nn.Sequential(torch.nn.Linear(4, 4))
    module.config = Config()
    with pytest.raises(SiteError, match=r"'mystery' is not in the family table .* not "
                                        r"recognisable \(no ModuleList as long as the config's "
                                        r"num_hidden_layers\)\. Pass the module paths by hand"):
        adapter_for(module)


def test_a_hybrid_model_is_refused_because_its_blocks_differ(demo):
    module = build("qwen3_5_text", len(demo.tokenizer), head_dim=8,
                   layer_types=["linear_attention", "full_attention"])
    with pytest.raises(SiteError, match=r"'qwen3_5_text' is not in the family table .*its "
                                        r"blocks differ \(linear_attn, .* / self_attn, .*\): a "
                                        r"hybrid model"):
        adapter_for(module)
