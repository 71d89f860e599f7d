"""TransformerLens habits (``model.blocks``, ``run_with_cache``, ``model.cfg``, ``hook_*`` names,
``model.W_U``, ``utils.get_act_name``) are clear errors naming what to write here, on this
model's own module paths; and what they name is right: the suggested site, run in a trace,
equals the value a plain PyTorch hook sees."""

from __future__ import annotations

import re

import pytest
import torch

import ipy_intervene as ii
from ipy_intervene.errors import InterventionError, MissingAttributeError, SiteError
from ipy_intervene.arch.sites import adapter_for, get_path
from ipy_intervene.habits.transformer_lens import tl_site
from conftest import PROMPT, SHORT, checksum, hook_count

PATHS = {  # blocks, attention, MLP out-projection, norm between attention and MLP
    "gpt2": ("transformer.h", "attn", "c_proj", "ln_2"),
    "neox": ("gpt_neox.layers", "attention", "dense_4h_to_h", None),
    "llama": ("model.layers", "self_attn", "down_proj", "post_attention_layernorm"),
}


def suggested(message: str) -> str:
    """The first ``model.…`` site named in backticks."""
    return re.search(r"`(model\.[^`]+)`", message).group(1)


def fails(model, source, error, match, prompt=PROMPT):
    ns = {"keep": 1}
    before, weights = hook_count(model.module), checksum(model.module)
    with pytest.raises(error, match=match) as info:
        ii.trace(model, source, prompt, namespace=ns)
    assert ns == {"keep": 1, "model": model}
    assert hook_count(model.module) == before and checksum(model.module) == weights
    return str(info.value)


def test_root_names_say_what_to_write(arch_model):
    arch, model = arch_model
    blocks, attn, _, _ = PATHS[arch]
    expected = {
        "blocks": rf"the blocks are `model\.{re.escape(blocks)}`.*`blocks\[l\]\."
                  rf"hook_resid_pre` -> `model\.{re.escape(blocks)}\[l\]\.input`",
        "cfg": r"the config is `model\.config`.*num_hidden_layers",
        "run_with_cache": r"a %%trace cell is the run.*ii\.cache\(model, prompts",
        "run_with_hooks": r"write the edit in a %%trace cell",
        "reset_hooks": r"hooks exist only while a %%trace cell runs",
        "W_U": r"the unembedding is `model\.lm_head\.weight\.T`",
        "W_E": r"the token embedding is `model\.[\w.]+\.weight` \(\[vocab, d_model\]\)",
        "W_Q": rf"there are no stacked.*`model\.{re.escape(blocks)}\[l\]\.{attn}`",
        "ln_final": r"the final norm is `model\.",
        "to_single_token": r"write `model\.token_id\(word\)`",
    }
    for name, match in expected.items():
        with pytest.raises(MissingAttributeError, match=rf"`model\.{name}` is TransformerLens's: here "
                                                        + match):
            getattr(model, name)
        assert not hasattr(model, name)  # still an AttributeError
    assert model.config.num_hidden_layers == 3
    assert model.to_tokens(SHORT).shape == (1, 7)  # to_tokens exists: no habit


@pytest.mark.parametrize("hook, module_of", [
    ("hook_resid_pre", lambda m, p, l: ("pre", p.block(m, l))),
    ("hook_resid_post", lambda m, p, l: ("out", p.block(m, l))),
    ("hook_resid_mid", lambda m, p, l: ("pre", p.module(m, "resid_mid", l))),
    ("hook_attn_out", lambda m, p, l: ("out0", p.module(m, "attn_out", l))),
    ("hook_mlp_out", lambda m, p, l: ("out", p.module(m, "mlp_out", l))),
])
def test_block_hook_names_name_the_site_and_the_site_is_right(arch_model, hook, module_of):
    arch, model = arch_model
    blocks = PATHS[arch][0]
    if hook == "hook_resid_mid" and PATHS[arch][3] is None:
        fails(model, f"x = model.{blocks}[2].{hook}", SiteError,
              r"line 1: `hook_resid_mid` does not exist in this model.*parallel residual")
        return
    message = fails(model, f"x = 1\ny = model.{blocks}[2].{hook}", SiteError,
                    rf"line 2: `{hook}` is TransformerLens's hook name: here write "
                    rf"`model\.{re.escape(blocks)}\[2\]")
    site = suggested(message)
    assert site == tl_site(f"blocks.2.{hook}", model.module)
    ns = {}
    ii.trace(model, f"x = {site}", PROMPT, namespace=ns)
    kind, module = module_of(model.module, adapter_for(model), 2)
    assert torch.equal(ns["x"], oracle(model, module, kind))


def oracle(model, module, kind):
    """What a plain hook on ``module`` sees: its first input, output or output[0]."""
    seen = {}
    if kind == "pre":
        handle = module.register_forward_pre_hook(lambda m, a: seen.__setitem__("v", a[0]))
    else:
        handle = module.register_forward_hook(lambda m, a, o: seen.__setitem__(
            "v", o[0] if kind == "out0" else o))
    try:
        with torch.no_grad():
            model.module(**model.prepare([PROMPT]).kwargs)
    finally:
        handle.remove()
    return seen["v"]


def test_mlp_hook_post_names_the_input_of_the_out_projection(arch_model):
    arch, model = arch_model
    blocks, _, out_proj, _ = PATHS[arch]
    message = fails(model, f"y = model.{blocks}[1].mlp.hook_post", SiteError,
                    rf"line 1: `hook_post` .* `model\.{re.escape(blocks)}\[1\]\.mlp\.{out_proj}"
                    r"\.input`")
    ns = {}
    ii.trace(model, f"x = {suggested(message)}", PROMPT, namespace=ns)
    module = get_path(model.module, f"{blocks}")[1].mlp.get_submodule(out_proj)
    assert torch.equal(ns["x"], oracle(model, module, "pre"))


@pytest.mark.parametrize("hook, site", [("hook_pattern", "pattern"), ("hook_z", "z"),
                                        ("hook_q", "q"), ("hook_k", "k"), ("hook_v", "v"),
                                        ("hook_result", "result")])
def test_attention_hook_names_name_the_attention_sites(arch_model, hook, site):
    arch, model = arch_model
    blocks, attn, _, _ = PATHS[arch]
    want = rf"`model\.{re.escape(blocks)}\[1\]\.{attn}\.{site}\.output`"
    for where in (f"{blocks}[1].{attn}", f"{blocks}[1]"):  # on the attention or its block
        message = fails(model, f"p = model.{where}.{hook}", SiteError,
                        rf"line 1: `{hook}` is TransformerLens's hook name: here write {want}")
    ns = {}
    ii.trace(model, f"p = {suggested(message)}", SHORT, namespace=ns)
    assert ns["p"].shape[0] == 1
    if site == "pattern":
        assert ns["p"].shape[-2:] == (7, 7)
        torch.testing.assert_close(ns["p"].sum(-1), torch.ones(ns["p"].shape[:-1]))


def test_tl_child_names_of_a_block_name_ours(arch_model):
    arch, model = arch_model
    blocks, attn, _, _ = PATHS[arch]
    if attn == "attn":
        assert model.transformer.h[0].attn.path == "transformer.h[0].attn"
        return
    with pytest.raises(MissingAttributeError,
                       match=rf"`attn` is TransformerLens's name: here it is "
                             rf"`model\.{re.escape(blocks)}\[0\]\.{attn}`"):
        get_path(model, blocks)[0].attn


def test_blocks_in_a_cell_is_refused_at_its_line_with_the_translation(arch_model):
    arch, model = arch_model
    blocks = PATHS[arch][0]
    fails(model, "x = 1\nh = model.blocks[0].hook_resid_pre\n", SiteError,
          rf"line 2: `model\.blocks` is TransformerLens's: here the blocks are "
          rf"`model\.{re.escape(blocks)}`")


def test_get_act_name_names_the_site(arch_model):
    arch, model = arch_model
    blocks = PATHS[arch][0]
    fails(model, "x = 1\nh = utils.get_act_name('resid_pre', 0)\n", InterventionError,
          rf"line 2: `utils\.get_act_name` is TransformerLens's.*"
          rf"`model\.{re.escape(blocks)}\[0\]\.input`")


def test_tl_activation_names_translate(demo):
    assert tl_site("blocks.3.hook_resid_post", demo.module) == "model.transformer.h[3].output"
    assert tl_site("blocks.0.attn.hook_z", demo.module) == "model.transformer.h[0].attn.z.output"
    assert tl_site("blocks.1.mlp.hook_post", demo.module) == \
        "model.transformer.h[1].mlp.c_proj.input"
    assert tl_site("hook_embed", demo.module) == "model.transformer.wte.output"
    assert tl_site("ln_final.hook_normalized", demo.module) == "model.transformer.ln_f.output"
    assert tl_site("blocks.1.hook_nonsense", demo.module) is None


def test_the_magic_shows_the_translation_at_the_line(shell):
    shell.user_ns["p"] = PROMPT
    with pytest.raises(SiteError, match=r"line 3: `hook_resid_post` .* "
                                        r"`model\.transformer\.h\[1\]\.output`"):
        shell.run_cell("%%trace model p\nx = 1\nh = model.transformer.h[1].hook_resid_post\n")
    assert "x" not in shell.user_ns and "h" not in shell.user_ns
    assert hook_count(shell.user_ns["model"].module) == 0


def test_plain_modules_get_no_tl_hint():
    model = ii.wrap(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    with pytest.raises(MissingAttributeError) as info:
        model.blocks
    assert "TransformerLens" not in str(info.value)
