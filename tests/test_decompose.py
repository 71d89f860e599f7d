"""ii.decompose: direct logit attribution on GPT-2, GPT-NeoX (parallel and sequential) and
Llama shapes, checked against the models' own logits and a hand-written hook oracle."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

import ipy_intervene as ii
from ipy_intervene.errors import InputError
from conftest import PROMPT, checksum, hook_count, hooks, layers, tiny_model

OUT_PROJ = {"gpt2": "attn.c_proj", "neox": "attention.dense", "llama": "self_attn.o_proj"}
FINAL_NORM = {"gpt2": "transformer.ln_f", "neox": "gpt_neox.final_layer_norm",
              "llama": "model.norm"}


@pytest.fixture(scope="module")
def sequential_neox(demo) -> ii.Model:
    """A tiny GPT-NeoX whose attention and MLP run one after the other."""
    torch.manual_seed(1)
    cfg = GPTNeoXConfig(vocab_size=len(demo.tokenizer), hidden_size=32, num_hidden_layers=3,
                        num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
                        use_parallel_residual=False, bos_token_id=0, eos_token_id=0,
                        pad_token_id=1)
    return ii.wrap(GPTNeoXForCausalLM(cfg).eval(), demo.tokenizer)


def plain_logits(model: ii.Model, prompt: str = PROMPT) -> torch.Tensor:
    with torch.no_grad():
        return model.module(**model.prepare([prompt]).kwargs).logits[0]


def real_diff(model: ii.Model, pos: int = -1, good: str = "Mary", bad: str = "John") -> float:
    logits = plain_logits(model)[pos]
    return float(logits[model.token_id(good)] - logits[model.token_id(bad)])


def get(root: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        root = getattr(root, part)
    return root


# -- the components add up to the model's own logit difference -------------------------------


def test_components_sum_to_the_models_logit_diff(arch_model):
    arch, model = arch_model
    d = ii.decompose(model, PROMPT, ii.logit_diff("Mary", "John"))
    assert abs(sum(d.components.values()) - real_diff(model)) < 1e-4
    assert abs(d.total - real_diff(model)) < 1e-4
    assert abs(d.actual - real_diff(model)) < 1e-4


def test_components_sum_on_a_sequential_neox(sequential_neox):
    d = ii.decompose(sequential_neox, PROMPT, ii.logit_diff("Mary", "John"))
    assert abs(d.total - real_diff(sequential_neox)) < 1e-4


def test_components_sum_on_the_demo_model(demo):
    d = ii.decompose(demo, PROMPT, ii.logit_diff("Mary", "John"))
    assert abs(d.total - real_diff(demo)) < 1e-4
    assert d.total > 1  # the demo model answers Mary


def test_components_at_another_position_sum_to_the_logit_diff_there(demo):
    d = ii.decompose(demo, PROMPT, ii.logit_diff("Mary", "John"), position=5)
    assert d.position == 5
    assert abs(d.total - real_diff(demo, pos=5)) < 1e-4


def test_components_are_named_per_architecture(arch_model):
    arch, model = arch_model
    names = list(ii.decompose(model, PROMPT, ii.logit_diff("Mary", "John")).components)
    assert names[0] == "embed"
    assert ("pos embed" in names) == (arch == "gpt2")           # rotary models add none
    assert ("attn bias 0" in names) == (arch != "llama")        # Llama has no biases
    assert ("final norm bias" in names) == (arch != "llama")    # RMSNorm has no bias
    assert names.index("L0H0") < names.index("L0H3") < names.index("mlp 0") < names.index("L1H0")


# -- per-head shares against a hand-written oracle ---------------------------------------------


def oracle_heads(arch: str, model: ii.Model, good: str, bad: str) -> torch.Tensor:
    """[layers, heads]: forward pre-hooks on the out-projections and the final norm, then
    the algebra by hand."""
    blocks = layers(model, arch)
    projs = [get(block, OUT_PROJ[arch]) for block in blocks]
    norm = get(model.module, FINAL_NORM[arch])
    zs, seen = {}, {}
    handles = [p.register_forward_pre_hook(lambda m, args, l=l: zs.__setitem__(l, args[0]))
               for l, p in enumerate(projs)]
    handles.append(norm.register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[0])))
    try:
        plain_logits(model)
    finally:
        for h in handles:
            h.remove()
    x = seen["x"][0, -1]
    if arch == "llama":
        scale = (x.pow(2).mean() + norm.variance_epsilon).sqrt()
    else:
        scale = (x.var(unbiased=False) + norm.eps).sqrt()
    w_u = model.module.lm_head.weight
    direction = w_u[model.token_id(good)] - w_u[model.token_id(bad)]
    n_heads = model.module.config.num_attention_heads if arch != "gpt2" else \
        model.module.config.n_head
    out = torch.zeros(len(projs), n_heads)
    for l, proj in enumerate(projs):
        weight = proj.weight if arch == "gpt2" else proj.weight.T  # -> [in, out]
        d_head = weight.shape[0] // n_heads
        for h in range(n_heads):
            part = slice(h * d_head, (h + 1) * d_head)
            vec = zs[l][0, -1, part] @ weight[part]
            if arch != "llama":
                vec = vec - vec.mean()
            out[l, h] = (vec / scale * norm.weight) @ direction
    return out


def test_head_shares_match_a_hook_oracle(arch_model):
    arch, model = arch_model
    d = ii.decompose(model, PROMPT, ii.logit_diff("Mary", "John"))
    expected = oracle_heads(arch, model, "Mary", "John")
    assert d.heads.shape == expected.shape
    assert torch.allclose(d.heads, expected, atol=1e-5, rtol=0)


def test_layer_attention_share_is_its_heads_plus_the_bias(demo):
    d = ii.decompose(demo, PROMPT, ii.logit_diff("Mary", "John"))
    for l in range(4):
        assert abs(float(d.layers["attn"][l]) - float(d.heads[l].sum())
                   - d.components[f"attn bias {l}"]) < 1e-5
        assert abs(float(d.layers["mlp"][l]) - d.components[f"mlp {l}"]) < 1e-6


# -- accumulated stream -------------------------------------------------------------------------


def test_accumulated_steps_are_the_layer_shares_and_end_at_the_total(arch_model):
    arch, model = arch_model
    d = ii.decompose(model, PROMPT, ii.logit_diff("Mary", "John"))
    steps = d.accumulated.diff()
    assert torch.allclose(steps, d.layers["attn"] + d.layers["mlp"], atol=1e-4)
    assert abs(float(d.accumulated[-1]) - d.total) < 1e-4
    assert d.labels == ["embed"] + [f"L{l}" for l in range(3)]


def test_logit_lens_recomputes_the_norm_on_each_block_output(arch_model):
    arch, model = arch_model
    d = ii.decompose(model, PROMPT, ii.logit_diff("Mary", "John"))
    outs = []
    first = lambda m, args, kwargs: outs.append(  # noqa: E731
        (args[0] if args else kwargs["hidden_states"])[0, -1])
    blocks = layers(model, arch)
    handle = blocks[0].register_forward_pre_hook(first, with_kwargs=True)
    try:
        with hooks(*[(b, lambda m, a, out: outs.append(
                (out[0] if isinstance(out, tuple) else out)[0, -1])) for b in blocks]):
            plain_logits(model)
    finally:
        handle.remove()
    good, bad = model.token_id("Mary"), model.token_id("John")
    with torch.no_grad():
        logits = model.module.lm_head(get(model.module, FINAL_NORM[arch])(torch.stack(outs)))
    expected = logits[:, good] - logits[:, bad]
    assert torch.allclose(d.logit_lens, expected, atol=1e-4)


# -- readouts --------------------------------------------------------------------------------


def test_a_direction_tensor_gives_the_same_shares(demo):
    w_u = demo.module.lm_head.weight.detach()
    direction = w_u[demo.token_id("Mary")] - w_u[demo.token_id("John")]
    by_metric = ii.decompose(demo, PROMPT, ii.logit_diff("Mary", "John"))
    by_direction = ii.decompose(demo, PROMPT, direction)
    assert by_direction.metric == "direction"
    assert torch.allclose(by_direction.heads, by_metric.heads, atol=1e-5)
    assert abs(by_direction.total - by_metric.total) < 1e-4


def test_one_token_decomposes_its_logit(arch_model):
    arch, model = arch_model
    d = ii.decompose(model, PROMPT, "Mary")
    assert abs(d.total - float(plain_logits(model)[-1, model.token_id("Mary")])) < 1e-4


def test_a_prob_metric_is_refused_as_not_linear(demo):
    with pytest.raises(InputError, match="linear"):
        ii.decompose(demo, PROMPT, ii.prob("Mary"))


def test_a_direction_of_the_wrong_width_is_refused(demo):
    with pytest.raises(InputError, match=r"shape \[\d+\]"):
        ii.decompose(demo, PROMPT, torch.ones(3))


def test_a_position_past_the_prompt_is_refused(demo):
    with pytest.raises(InputError, match="position 99"):
        ii.decompose(demo, PROMPT, ii.logit_diff("Mary", "John"), position=99)


class MaxNorm(nn.Module):
    """A norm none of the final-norm forms describes (it divides by the largest entry)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((width,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / x.abs().amax(-1, keepdim=True) * self.weight


def test_a_final_norm_it_cannot_freeze_is_refused_not_misread(demo):
    module = tiny_model("llama", len(demo.tokenizer))
    module.model.norm = MaxNorm(32)
    with pytest.raises(InputError, match="final norm"):
        ii.decompose(ii.wrap(module, demo.tokenizer), PROMPT, ii.logit_diff("Mary", "John"))


# -- no trace left behind ---------------------------------------------------------------------


def test_one_forward_no_hook_left_and_the_model_unchanged(arch_model):
    arch, model = arch_model
    before, sum_before = hook_count(model.module), checksum(model.module)
    calls = []
    counter = model.module.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        assert torch.is_grad_enabled()
        d = ii.decompose(model, PROMPT, ii.logit_diff("Mary", "John"))
        assert hook_count(model.module) == before + 1  # the counter, nothing of ours
    finally:
        counter.remove()
    assert calls == [1]
    assert checksum(model.module) == sum_before
    assert torch.is_grad_enabled()
    assert not d.heads.requires_grad and not d.accumulated.requires_grad


# -- result and view ----------------------------------------------------------------------------


def test_top_lists_the_largest_components_by_size(demo):
    d = ii.decompose(demo, PROMPT, ii.logit_diff("Mary", "John"))
    top = d.top(5)
    assert len(top) == 5
    sizes = [abs(v) for _, v in top]
    assert sizes == sorted(sizes, reverse=True)
    assert sizes[0] == max(abs(v) for v in d.components.values())
    for name, _ in top:
        assert re.fullmatch(r"L\d+H\d+|mlp \d+|attn bias \d+|embed|pos embed|"
                            r"final norm bias|unembed bias", name)


def test_repr_names_the_metric_position_and_total(demo):
    d = ii.decompose(demo, PROMPT, ii.logit_diff("Mary", "John"))
    assert "logit_diff('Mary', 'John')" in repr(d)
    assert f"{d.total:+.4f}" in repr(d)
    name, _ = d.top(1)[0]
    assert name in d.text(3) and d.text(3).count("\n") == 4


def test_display_is_offline_html_with_a_centred_head_heatmap(demo):
    d = ii.decompose(demo, PROMPT, ii.logit_diff("Mary", "John"))
    bundle = d._repr_mimebundle_()
    assert set(bundle) == {"text/html", "image/svg+xml", "text/plain"}  # static picture too
    assert bundle["image/svg+xml"].startswith("<svg") and "L1H3" in bundle["image/svg+xml"]
    assert "ii-decompose-top" in bundle["text/html"] and d.top(1)[0][0] in bundle["text/html"]
    assert bundle["text/plain"].startswith("DecomposeResult(")
    heat = d.figure().data[0]
    assert heat.type == "heatmap" and heat.zmid == 0 and heat.zmin == -heat.zmax
    assert heat.text[1][3] == "L1H3"
    bars = d.figure().data[-1]
    assert "mlp 0" in bars.x and not any(re.fullmatch(r"L\d+H\d+", n) for n in bars.x)
