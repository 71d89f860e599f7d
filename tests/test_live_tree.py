"""The wrapped module tree follows ``model.module``: modules replaced or added after ``ii.wrap``
(through the envoys or on the raw module) are what the next access, ``owns``/``envoy_for``
and a ``%%trace`` cell see; checked against plain PyTorch hooks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ipy_intervene as ii
from ipy_intervene.errors import InterventionError, SiteError
from conftest import PROMPT, SHORT, checksum, hook_count, hooks, tiny_model


class Spliced(nn.Module):
    """A decoder block followed by ``extra`` on its hidden states (tuple or tensor output)."""

    def __init__(self, block: nn.Module, width: int = 32) -> None:
        super().__init__()
        self.block = block
        self.extra = nn.Identity()

    def forward(self, hidden_states, *args, **kwargs):
        out = self.block(hidden_states, *args, **kwargs)
        if isinstance(out, tuple):
            return (self.extra(out[0]),) + out[1:]
        return self.extra(out)


def linear(seed: int) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(32, 32)
    with torch.no_grad():
        layer.weight.mul_(0.1)
        layer.weight.add_(torch.eye(32))
    return layer.eval()


@pytest.fixture
def model(demo) -> ii.Model:
    """A fresh GPT-2-shaped model per test (the tests change its tree)."""
    return ii.wrap(tiny_model("gpt2", len(demo.tokenizer)), demo.tokenizer)


def ids(model: ii.Model, prompt: str) -> dict:
    return model.prepare([prompt]).kwargs


def plain(model: ii.Model, prompt: str, module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(module's output, logits) of a plain forward with a hook."""
    seen = {}
    with torch.no_grad(), hooks((module, lambda m, a, o: seen.__setitem__("out", o))):
        logits = model.module(**ids(model, prompt)).logits
    out = seen["out"]
    return (out[0] if isinstance(out, tuple) else out), logits


def test_a_layer_replaced_through_the_envoy_is_the_one_the_tree_and_a_trace_see(model):
    old_envoy = model.transformer.h[2]
    old = old_envoy.module
    new = Spliced(old)
    model.transformer.h[2] = new
    assert model.module.transformer.h[2] is new
    assert model.transformer.h[2].module is new
    assert model.transformer.h[2].block.module is old
    assert model.owns(new) and model.owns(old)  # old lives on inside the splice
    assert model.envoy_for(new).path == "transformer.h[2]"
    assert model.envoy_for(old).path == "transformer.h[2].block"
    ns = {}
    ii.trace(model, "h = model.transformer.h[2].output\nlogits = model.lm_head.output",
             PROMPT, namespace=ns)
    expected, logits = plain(model, PROMPT, new)
    assert torch.equal(ns["h"], expected)
    assert torch.equal(ns["logits"], logits)


def test_a_module_added_on_the_raw_module_is_seen_by_the_next_access(model):
    model.transformer.h[2] = Spliced(model.module.transformer.h[2])
    assert isinstance(model.transformer.h[2].extra.module, nn.Identity)  # cached envoy
    extra = linear(3)
    model.module.transformer.h[2].extra = extra          # behind the wrapper's back
    assert model.transformer.h[2].extra.module is extra
    assert model.owns(extra)
    assert model.envoy_for(extra).path == "transformer.h[2].extra"
    ns = {}
    ii.trace(model, "e = model.transformer.h[2].extra.output", PROMPT, namespace=ns)
    expected, clean = plain(model, PROMPT, extra)
    assert torch.equal(ns["e"], expected)
    ii.trace(model, "model.transformer.h[2].extra.output[:, -1] = 0\n"
                    "logits = model.lm_head.output", PROMPT, namespace=ns)

    def zero_last(m, a, o):
        o = o.clone()
        o[:, -1] = 0
        return o

    with torch.no_grad(), hooks((extra, zero_last)):
        logits = model.module(**ids(model, PROMPT)).logits
    assert torch.allclose(ns["logits"], logits, atol=1e-6)
    assert not torch.allclose(ns["logits"], clean, atol=1e-3)


def test_a_layer_replaced_on_the_raw_module_gets_a_new_envoy(model):
    first = model.transformer.h[1]
    other = Spliced(model.module.transformer.h[1])
    other.extra = linear(5)
    model.module.transformer.h[1] = other
    assert model.transformer.h[1] is not first
    assert model.transformer.h[1].module is other
    assert model.envoy_for(first.module).path == "transformer.h[1].block"
    assert model.envoy_for(other).path == "transformer.h[1]"
    ns = {}
    ii.trace(model, "x = model.transformer.h[1].extra.output", [PROMPT, SHORT], namespace=ns)
    for row, prompt in enumerate([PROMPT, SHORT]):
        expected, _ = plain(model, prompt, other.extra)
        n = expected.shape[1]
        assert torch.allclose(ns["x"][row, -n:], expected[0], atol=1e-5)


def test_an_envoy_held_from_before_the_replacement_is_not_part_of_the_model(model):
    stale = model.transformer.h[0]
    model.module.transformer.h[0] = Spliced(stale.module.__class__(model.module.config, 0))
    assert not model.owns(stale.module)
    before = hook_count(model.module)
    ns = {"stale": stale}
    with pytest.raises(SiteError, match="not part of the model"):
        ii.trace(model, "y = stale.output", PROMPT, namespace=ns)
    assert "y" not in ns
    assert hook_count(model.module) == before


def test_assigning_something_that_is_not_a_module_is_a_clear_error(model):
    old = model.module.transformer.h[2]
    with pytest.raises(SiteError, match=r"model\.transformer\.h\[2\] = \.\.\..*nn\.Module"):
        model.transformer.h[2] = torch.zeros(3)
    with pytest.raises(SiteError, match=r"model\.transformer\.h\[2\]\.mlp = .*Identity"):
        model.transformer.h[2].mlp = None
    with pytest.raises(SiteError, match="past the end"):
        model.transformer.h[7] = nn.Identity()
    with pytest.raises(SiteError, match="cannot be indexed"):
        model.transformer.ln_f[0] = nn.Identity()
    assert model.module.transformer.h[2] is old and old.mlp is model.transformer.h[2].mlp.module


def test_plain_attributes_still_go_to_the_module(model):
    model.transformer.h[0].my_flag = 3
    assert model.module.transformer.h[0].my_flag == 3
    model.transformer.h[0].new_head = nn.Linear(32, 2)  # a new child module
    assert "new_head" in model.module.transformer.h[0]._modules
    assert model.transformer.h[0].new_head.path == "transformer.h[0].new_head"


def test_module_dicts_and_sequentials_take_replacements(model):
    model.module.transformer.extra = nn.ModuleDict({"a": nn.Identity()})
    model.transformer.extra["a"] = nn.Linear(2, 2)
    assert isinstance(model.transformer.extra["a"].module, nn.Linear)
    model.module.transformer.seq = nn.Sequential(nn.Identity(), nn.ReLU())
    model.transformer.seq[-1] = nn.Tanh()
    assert isinstance(model.module.transformer.seq[1], nn.Tanh)
    assert model.transformer.seq[1].path == "transformer.seq[1]"


def test_replacing_a_module_inside_a_trace_is_refused_and_changes_nothing(model):
    old = model.module.transformer.h[2]
    before, weights = hook_count(model.module), checksum(model.module)
    ns = {"Identity": nn.Identity}
    source = "h = model.transformer.h[1].output\nmodel.transformer.h[2] = Identity()\n"
    with pytest.raises(InterventionError, match=r"while a trace runs"):
        ii.trace(model, source, PROMPT, namespace=ns)
    assert model.module.transformer.h[2] is old
    assert "h" not in ns
    assert hook_count(model.module) == before and checksum(model.module) == weights


def test_the_models_own_attributes_are_set_on_the_wrapper(model, demo):
    other = demo.tokenizer
    model.tokenizer = None
    assert model.tokenizer is None and "tokenizer" not in vars(model.module)
    model.tokenizer = other
    assert model.tokenizer is other
    with pytest.raises(AttributeError, match="read-only"):
        model.transformer.h[0].path = "elsewhere"
    with pytest.raises(AttributeError, match="read-only"):
        model.transformer.module = nn.Linear(2, 2)
    assert not hasattr(model.module.transformer, "path")
    assert "module" not in model.module.transformer._modules
    config = model.config
    model.config = config  # the module's own attribute: still set on the module
    assert model.module.config is config
