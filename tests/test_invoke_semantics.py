"""Several prompts in one cell never mix: every common method, written as explicit invokes and
as a `for` loop of invokes over prompts of different lengths, equals the same work run one
prompt at a time (no padding) with plain PyTorch hooks, on GPT-2, NeoX, Llama (GQA) and the
demo model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pytest
import torch

import ipy_intervene as ii
from alone_oracle import edit, ids, module, run_alone
from attention_oracle import logits_by_hand
from conftest import PROMPT, SHORT, greedy_generate, hook_count, tiny_model

PROMPTS = [PROMPT, SHORT, "When Mary and John went to the store", "Then , John had a drink"]
SOURCE = "After Mary and John went to the park , Mary gave a drink to"


@pytest.fixture(scope="module", params=["demo", "gpt2", "neox", "llama"])
def any_model(request, demo):
    if request.param == "demo":
        return demo
    return ii.wrap(tiny_model(request.param, len(demo.tokenizer)), demo.tokenizer)


def paths(model) -> dict[str, str]:
    ad = ii.adapter_for(model)
    return {"B": f"model.{ad.blocks}", "N": f"model.{ad.final_norm}",
            "U": f"model.{ad.unembed}", "A": ad.attn, "M": ad.mlp}


def extras(model) -> dict:
    width = model.config.hidden_size if hasattr(model.config, "hidden_size") else model.config.n_embd
    gen = torch.Generator().manual_seed(1)
    return {"vec": torch.randn(width, generator=gen), "mu": torch.randn(width, generator=gen),
            "tok": 5}


# -- the oracle: one prompt, no padding, plain hooks ---------------------------------------

def capture(store, key):
    def hook(mod, args, out):
        store[key] = out
    return hook


@dataclass
class Method:
    body: str                          # one invoke's body; `i` is its index, `out` a list
    oracle: Callable                   # (model, paths, text, i, extras) -> expected tensor
    position_dims: tuple[int, ...] = (1,)
    grad: bool = False
    first: str = ""                    # an invoke before the prompts' (cross-invoke flow)
    after: str = ""


def lens_oracle(model, p, text, i, x):
    seen = {}
    run_alone(model, text, post=[(block(p, 1), capture(seen, "h"))])
    return module(model, p["U"])(module(model, p["N"])(seen["h"]))


def steer_oracle(model, p, text, i, x):
    def f(o): o[:, -1] += (i + 1) * x["vec"]
    return run_alone(model, text, post=[(block(p, 1), edit(f))])


def patch_oracle(model, p, text, i, x):
    seen = {}
    run_alone(model, SOURCE, post=[(block(p, 1), capture(seen, "h"))])
    def f(o): o[:, -1] = seen["h"][:, -1]
    return run_alone(model, text, post=[(block(p, 1), edit(f))])


def zero_oracle(model, p, text, i, x):
    return run_alone(model, text, post=[(block(p, 1) + "." + p["M"], lambda m, a, o: o * 0)])


def mean_oracle(model, p, text, i, x):
    def f(o): o[:, -2:] = x["mu"]
    return run_alone(model, text, post=[(block(p, 1) + "." + p["M"], edit(f))])


def replace_oracle(model, p, text, i, x):
    return run_alone(model, text, post=[(block(p, 1), lambda m, a, o: o * (0.5 + i))])


def skip_oracle(model, p, text, i, x):
    return run_alone(model, text, post=[(block(p, 2), lambda m, a, o: a[0])])


def stop_oracle(model, p, text, i, x):
    seen = {}
    run_alone(model, text, post=[(block(p, 1), capture(seen, "h"))])
    return seen["h"]


def path_oracle(model, p, text, i, x):
    seen = {}

    def rewire(mod, args):
        h = args[0].clone()
        h[:, -1] = seen[0][:, -1] * 0.5 + seen[1][:, -1]
        return (h, *args[1:])

    return run_alone(model, text, post=[(block(p, 0), capture(seen, 0)),
                                         (block(p, 1), capture(seen, 1))],
                      pre=[(block(p, 2), rewire)])


def grad_oracle(model, p, text, i, x):
    seen = {}
    logits = run_alone(model, text, post=[(block(p, 1), capture(seen, "h"))], grad=True)
    (grad,) = torch.autograd.grad(logits[0, -1, x["tok"]], seen["h"])  # no .grad left on weights
    return grad


def block(p, layer: int) -> str:
    return f"{p['B']}.{layer}"


METHODS = {
    "logit lens": Method("h = {B}[1].output\nout.append((i, {U}({N}(h))))", lens_oracle),
    "steering": Method("{B}[1].output[:, -1] += (i + 1) * vec\nout.append((i, {U}.output))",
                       steer_oracle),
    "activation patching": Method(
        "{B}[1].output[:, -1] = clean_h[:, -1]\nout.append((i, {U}.output))", patch_oracle,
        first="with tracer.invoke(source):\n    clean_h = {B}[1].output\n"),
    "zero ablation": Method("{B}[1].{M}.output[:] = 0\nout.append((i, {U}.output))",
                            zero_oracle),
    "mean ablation": Method("{B}[1].{M}.output[:, -2:] = mu\nout.append((i, {U}.output))",
                            mean_oracle),
    "replace": Method("{B}[1].output = {B}[1].output * (0.5 + i)\nout.append((i, {U}.output))",
                      replace_oracle),
    "skip": Method("{B}[2].skip({B}[2].input)\nout.append((i, {U}.output))", skip_oracle),
    "early stop": Method("out.append((i, {B}[1].output))\ntracer.stop()", stop_oracle),
    "path rewiring": Method(
        "x = {B}[0].output[:, -1] * 0.5\n{B}[2].input[:, -1] = x + {B}[1].output[:, -1]\n"
        "out.append((i, {U}.output))", path_oracle),
    "attribution": Method(
        "h = {B}[1].output\nh.retain_grad()\nhs.append((i, h))\nlg.append((i, {U}.output))",
        grad_oracle, grad=True,
        after="sum(l[0, -1, tok] for _, l in lg).backward()\nout = [(i, h.grad) for i, h in hs]\n"),
}


def indent(text: str, by: str = "    ") -> str:
    return "".join(by + line + "\n" for line in text.splitlines())


def explicit_cell(method: Method, p: dict, n: int) -> str:
    cell = "out, hs, lg = [], [], []\n" + method.first.format(**p)
    for i in range(n):
        cell += f"with tracer.invoke(prompts[{i}]):\n" + indent(f"i = {i}\n" + method.body.format(**p))
    return cell + method.after


def loop_cell(method: Method, p: dict, n: int) -> str:
    return ("out, hs, lg = [], [], []\n" + method.first.format(**p)
            + "for i, p in enumerate(prompts):\n    with tracer.invoke(p):\n"
            + indent(method.body.format(**p), "        ") + method.after)


def crop(value: torch.Tensor, length: int, dims: tuple[int, ...]) -> torch.Tensor:
    for dim in dims:
        value = value.narrow(dim, value.shape[dim] - length, length)
    return value


def assert_close(value: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """Equal up to batching's float order: the largest difference at most 1e-4 of the
    largest value."""
    assert value.shape == want.shape, f"{what}: shape {list(value.shape)} != {list(want.shape)}"
    error = (value - want).abs().max().item()
    assert error <= 1e-4 * want.abs().max().item() + 1e-7, f"{what}: max difference {error:.3g}"


def check(model, name: str, form: str) -> None:
    method, p, x = METHODS[name], paths(model), extras(model)
    cell = (explicit_cell if form == "explicit" else loop_cell)(method, p, len(PROMPTS))
    ns = {"model": model, "prompts": PROMPTS, "source": SOURCE, **x}
    ii.trace(model, cell, namespace=ns, grad=method.grad)
    got = dict(ns["out"])
    assert sorted(got) == list(range(len(PROMPTS)))
    for i, text in enumerate(PROMPTS):
        want = method.oracle(model, p, text, i, x).detach()
        length = ids(model, text).shape[1]
        value = crop(got[i].detach(), length, method.position_dims)
        assert_close(value, want, f"{name}, {form}, prompt {i}")
        if value.shape[-1] == model.vocab_size:  # logits: the same top-1 everywhere
            assert torch.equal(value.argmax(-1), want.argmax(-1))
    assert hook_count(model.module) == 0


@pytest.mark.parametrize("form", ["explicit", "loop"])
@pytest.mark.parametrize("name", list(METHODS))
def test_each_invoke_equals_its_prompt_run_alone(any_model, name, form):
    check(any_model, name, form)


# -- attention patterns (eager and SDPA) ---------------------------------------------------

@pytest.mark.parametrize("form", ["explicit", "loop"])
def test_pattern_reads_equal_each_prompt_alone_and_leave_padding_empty(attention_case, form):
    arch, impl, model = attention_case
    p = paths(model)
    method = Method("out.append((i, {B}[1].{A}.pattern.output))", None, position_dims=(2, 3))
    cell = (explicit_cell if form == "explicit" else loop_cell)(method, p, len(PROMPTS))
    ns = {"model": model, "prompts": PROMPTS}
    ii.trace(model, cell, namespace=ns)
    got = dict(ns["out"])
    for i, text in enumerate(PROMPTS):
        _, seen = logits_by_hand(model, [text])
        length = ids(model, text).shape[1]
        pattern = got[i]
        assert_close(crop(pattern, length, (2, 3)), seen[1]["pattern"], f"pattern {i}")
        padding = pattern[..., -length:, :pattern.shape[-1] - length]
        assert torch.all(padding == 0), "a query attends to padding"


# -- generation with per-step steering -----------------------------------------------------

def generate_alone(model, text, coef, vec, steps):
    prompt = ids(model, text)

    def steer(mod, args, out):
        out = out.clone()
        out[:, -1] += coef * vec
        return out

    layer = module(model, paths(model)["B"])[1]
    handle = layer.register_forward_hook(steer)
    try:
        sequences, logits = greedy_generate(model, prompt, steps)
    finally:
        handle.remove()
    return sequences[0, prompt.shape[1]:], logits[0]


@pytest.mark.parametrize("form", ["explicit", "loop"])
def test_steered_generation_of_two_prompts_equals_each_alone(any_model, form):
    model, p, x = any_model, paths(any_model), extras(any_model)
    body = ("for step in tracer.steps():\n"
            "    {B}[1].output[:, -1] += (i + 1) * vec\n"
            "    out.append((i, step, {U}.output[:, -1]))\n")
    method = Method(body, None)
    pair = [PROMPTS[0], PROMPTS[1]]
    cell = (explicit_cell if form == "explicit" else loop_cell)(method, p, 2)
    ns = {"model": model, "prompts": pair, **x}
    result = ii.trace(model, cell, namespace=ns, generate=3, ignore_eos=True)
    for i, text in enumerate(pair):
        tokens, scores = generate_alone(model, text, i + 1, x["vec"], 3)
        assert torch.equal(result.new_tokens[i], tokens)
        logits = torch.cat([v for j, _, v in sorted(ns["out"], key=lambda t: t[:2]) if j == i])
        assert_close(logits, scores, f"generation {i}")
