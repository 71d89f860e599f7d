"""An invoke's positions are its own prompt's (issue 27): with prompts of different lengths in
one cell, every invoke sees what it would see run alone. Reads at positions from the start,
reductions over positions, writes, whole assignments, in-place edits, the sites inside
attention, `.inputs`, skips, `tracer.output`, `--grad`, `--generate` and `--dry-run`, as
explicit invokes and as a `for` loop of invokes, on the demo model and a small Llama (GQA),
each checked against the same work run ONE PROMPT AT A TIME with plain PyTorch hooks. Where
a value's layout cannot be known, the read is a clear error naming the line."""

from __future__ import annotations


import pytest
import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

import ipy_intervene as ii
from ipy_intervene.errors import InterventionError, SiteError
from alone_oracle import edit, ids, module, run_alone
from attention_oracle import logits_by_hand
from conftest import PROMPT, SHORT, greedy_generate, hook_count, tiny_model

PROMPTS = [PROMPT, SHORT, "When Mary and John went to the store", "Then , John had a drink to"]
LENGTHS = [15, 7, 9, 8]                        # tokens of each, BOS included


@pytest.fixture(scope="module", params=["demo", "llama"])
def model(request, demo):
    if request.param == "demo":
        return demo
    return ii.wrap(tiny_model("llama", len(demo.tokenizer)), demo.tokenizer)


def paths(model) -> dict[str, str]:
    ad = ii.adapter_for(model)
    return {"B": f"model.{ad.blocks}", "U": f"model.{ad.unembed}", "A": ad.attn, "M": ad.mlp}


def width(model) -> int:
    return getattr(model.config, "hidden_size", None) or model.config.n_embd


def vec(model) -> torch.Tensor:
    return torch.randn(width(model), generator=torch.Generator().manual_seed(3))


# -- the oracle: one prompt, no padding, plain hooks ---------------------------------------

def seen_alone(model, text, path, pre=False):
    """The value ``path`` outputs (or takes, ``pre``) for ``text`` alone."""
    seen = {}
    if pre:
        run_alone(model, text, pre=[(path, lambda m, a: seen.setdefault("v", a[0]))])
    else:
        run_alone(model, text, post=[(path, lambda m, a, o: seen.setdefault("v", o))])
    return seen["v"]


def block(p, layer: int, child: str = "") -> str:
    return f"{p['B']}.{layer}" + (f".{p[child]}" if child else "")


# -- cells: explicit invokes and a loop of invokes ------------------------------------------

def indent(text: str, by: str) -> str:
    return "".join(by + line + "\n" for line in text.splitlines())


def cells(body: str, p: dict, n: int = len(PROMPTS), after: str = "") -> dict[str, str]:
    explicit = "out, hs, lg = [], [], []\n" + "".join(
        f"with tracer.invoke(prompts[{i}]):\n" + indent(f"i = {i}\n" + body.format(**p), "    ")
        for i in range(n)) + after
    loop = ("out, hs, lg = [], [], []\nfor i, p in enumerate(prompts):\n"
            "    with tracer.invoke(p):\n" + indent(body.format(**p), "        ") + after)
    return {"explicit": explicit, "loop": loop}


def close(got, want, what):
    assert got.shape == want.shape, f"{what}: shape {list(got.shape)} != {list(want.shape)}"
    error = (got - want).abs().max().item()
    assert error <= 1e-4 * max(want.abs().max().item(), 1.0), f"{what}: max difference {error:.3g}"


def each(ns) -> list[torch.Tensor]:
    got = dict(ns["out"])
    assert sorted(got) == list(range(len(got)))
    return [got[i].detach() for i in range(len(got))]


# -- reads ----------------------------------------------------------------------------------

READS = {
    # body (one invoke's), what to compare it with for its prompt alone
    "h[0, 2]": ("out.append((i, {B}[1].output[0, 2]))",
                lambda m, p, t: seen_alone(m, t, block(p, 1))[0, 2]),
    "h[:, -1]": ("out.append((i, {B}[1].output[:, -1]))",
                 lambda m, p, t: seen_alone(m, t, block(p, 1))[:, -1]),
    "h.mean(1)": ("out.append((i, {B}[1].output.mean(1)))",
                  lambda m, p, t: seen_alone(m, t, block(p, 1)).mean(1)),
    "h whole": ("out.append((i, {B}[1].output))",
                lambda m, p, t: seen_alone(m, t, block(p, 1))),
    "h[:, 1:4].sum(1)": ("out.append((i, {B}[1].output[:, 1:4].sum(1)))",
                         lambda m, p, t: seen_alone(m, t, block(p, 1))[:, 1:4].sum(1)),
    "input[0, 3]": ("out.append((i, {B}[2].input[0, 3]))",
                    lambda m, p, t: seen_alone(m, t, block(p, 2), pre=True)[0, 3]),
    ".inputs args[0]": ("a, k = {B}[2].inputs\nout.append((i, a[0] if a else k['hidden_states']))",
                        lambda m, p, t: seen_alone(m, t, block(p, 2), pre=True)),
    "mlp output": ("out.append((i, {B}[1].{M}.output[0, 1]))",
                   lambda m, p, t: seen_alone(m, t, block(p, 1, "M"))[0, 1]),
    "attention output[0]": ("out.append((i, {B}[1].{A}.output[0][:, 2]))",
                            lambda m, p, t: seen_alone(m, t, block(p, 1, "A"))[0][:, 2]),
    "tracer.output": ("out.append((i, tracer.output))", lambda m, p, t: run_alone(m, t)),
    "logits[0, 3]": ("out.append((i, {U}.output[0, 3]))", lambda m, p, t: run_alone(m, t)[0, 3]),
    "pattern": ("out.append((i, {B}[1].{A}.pattern.output))",
                lambda m, p, t: logits_by_hand(m, [t])[1][1]["pattern"]),
    "pattern[:, :, 2, :3]": ("out.append((i, {B}[1].{A}.pattern.output[:, :, 2, :3]))",
                             lambda m, p, t: logits_by_hand(m, [t])[1][1]["pattern"][:, :, 2, :3]),
    "q": ("out.append((i, {B}[1].{A}.q.output))",
          lambda m, p, t: logits_by_hand(m, [t])[1][1]["q"]),
    "k[:, :, 1]": ("out.append((i, {B}[1].{A}.k.output[:, :, 1]))",
                   lambda m, p, t: logits_by_hand(m, [t])[1][1]["k"][:, :, 1]),
    "z.mean(1)": ("out.append((i, {B}[1].{A}.z.output.mean(1)))",
                  lambda m, p, t: logits_by_hand(m, [t])[1][1]["z"].mean(1)),
}


@pytest.mark.parametrize("form", ["explicit", "loop"])
@pytest.mark.parametrize("name", list(READS))
def test_reads_see_the_invokes_own_positions(model, name, form):
    body, oracle = READS[name]
    p = paths(model)
    ns = {"model": model, "prompts": PROMPTS}
    ii.trace(model, cells(body, p)[form], namespace=ns)
    for i, (got, text) in enumerate(zip(each(ns), PROMPTS)):
        close(got, oracle(model, p, text).detach(), f"{name}, {form}, prompt {i}")
    assert hook_count(model.module) == 0


def test_a_whole_read_has_the_prompts_own_length(model):
    p = paths(model)
    ns = {"model": model, "prompts": PROMPTS}
    ii.trace(model, cells("out.append((i, {B}[0].output))", p)["loop"], namespace=ns)
    assert [h.shape[1] for h in each(ns)] == LENGTHS


# -- writes ---------------------------------------------------------------------------------

def pattern_edit(fn):
    return lambda layer, name, x: fn(x.clone()) if (layer, name) == (1, "pattern") else x


def zero_key_0(x):
    x[:, :, :, 0] = 0
    return x


WRITES = {
    # body, oracle (model, paths, text, i, vec) -> logits alone
    "h[:, 1] = 0": ("{B}[1].output[:, 1] = 0",
                    lambda m, p, t, i, v: run_alone(m, t, post=[(block(p, 1), edit(
                        lambda o: o.__setitem__((slice(None), 1), 0)))])),
    "h[0, 2:4] = vec": ("{B}[1].output[0, 2:4] = (i + 1) * vec",
                        lambda m, p, t, i, v: run_alone(m, t, post=[(block(p, 1), edit(
                            lambda o: o.__setitem__((0, slice(2, 4)), (i + 1) * v)))])),
    "output = output * 2": ("{B}[1].output = {B}[1].output * (i + 2)",
                            lambda m, p, t, i, v: run_alone(m, t, post=[(
                                block(p, 1), lambda mod, a, o: o * (i + 2))])),
    "output += vec": ("{B}[1].output += (i + 1) * vec",
                      lambda m, p, t, i, v: run_alone(m, t, post=[(
                          block(p, 1), lambda mod, a, o: o + (i + 1) * v)])),
    "mean ablation over positions": (
        "{B}[1].{M}.output[:] = {B}[1].{M}.output.mean(1, keepdim=True)",
        lambda m, p, t, i, v: run_alone(m, t, post=[(block(p, 1, "M"), lambda mod, a, o:
                                                     o.mean(1, keepdim=True).expand_as(o))])),
    "input[:, 2] = 0": ("{B}[2].input[:, 2] = 0",
                        lambda m, p, t, i, v: run_alone(m, t, pre=[(block(p, 2), lambda mod, a: (
                            a[0].index_fill(1, torch.tensor([2]), 0), *a[1:]))])),
    ".inputs = doubled": (
        "a, k = {B}[2].inputs\n{B}[2].inputs = ((a[0] * 2, *a[1:]), k)",
        lambda m, p, t, i, v: run_alone(m, t, pre=[(block(p, 2), lambda mod, a: (
            a[0] * 2, *a[1:]))])),
    "skip": ("{B}[2].skip({B}[2].input)",
             lambda m, p, t, i, v: run_alone(m, t, post=[(block(p, 2), lambda mod, a, o: a[0])])),
    "pattern[..., 0] = 0": ("{B}[1].{A}.pattern.output[:, :, :, 0] = 0",
                            lambda m, p, t, i, v: logits_by_hand(m, [t], pattern_edit(
                                zero_key_0))[0]),
}


@pytest.mark.parametrize("form", ["explicit", "loop"])
@pytest.mark.parametrize("name", list(WRITES))
def test_writes_equal_the_same_write_on_the_prompt_alone(model, name, form):
    body, oracle = WRITES[name]
    p, v = paths(model), vec(model)
    ns = {"model": model, "prompts": PROMPTS, "vec": v}
    ii.trace(model, cells(body + "\nout.append((i, {U}.output))", p)[form], namespace=ns)
    for i, (got, text) in enumerate(zip(each(ns), PROMPTS)):
        want = oracle(model, p, text, i, v).detach()
        close(got, want, f"{name}, {form}, prompt {i}")
        assert torch.equal(got.argmax(-1), want.argmax(-1))
    assert hook_count(model.module) == 0


def test_a_write_leaves_the_other_prompts_alone(model):
    """The longest prompt's rows at the positions a shorter invoke does not see are not
    touched by its writes (`h[:, 0] = 0` of the 7-token prompt is its BOS, not position 0 of
    the batch)."""
    p = paths(model)
    cell = ("with tracer.invoke(long):\n    a = {U}.output\n"
            "with tracer.invoke(short):\n    {B}[1].output[:, 0] = 0\n    {B}[1].output *= 0.5\n"
            "    b = {U}.output\n").format(**p)
    ns = {"model": model, "long": PROMPT, "short": SHORT}
    ii.trace(model, cell, namespace=ns)
    close(ns["a"], run_alone(model, PROMPT), "the long prompt")

    def f(o):
        o[:, 0] = 0
        o *= 0.5
    close(ns["b"], run_alone(model, SHORT, post=[(block(p, 1), edit(f))]), "the short prompt")


def test_values_flow_between_invokes_of_different_lengths(model):
    """Activation patching at a position counted from the start of each prompt."""
    p = paths(model)
    cell = ("with tracer.invoke(source):\n    h = {B}[1].output\n"
            "for p in prompts:\n    with tracer.invoke(p):\n"
            "        {B}[1].output[:, 3] = h[:, 3]\n        out.append({U}.output)\n").format(**p)
    ns = {"model": model, "source": PROMPT, "prompts": PROMPTS[1:], "out": []}
    ii.trace(model, cell, namespace=ns)
    h = seen_alone(model, PROMPT, block(p, 1))
    for got, text in zip(ns["out"], PROMPTS[1:]):
        close(got, run_alone(model, text, post=[(block(p, 1), edit(
            lambda o: o.__setitem__((slice(None), 3), h[:, 3])))]), text)


def test_an_invoke_of_several_prompts_sees_them_padded_to_its_longest(model):
    """Several prompts in one invoke: its rows padded to its own longest prompt (9 tokens),
    which `ii.positions` maps; the other invoke is longer (15)."""
    p = paths(model)
    cell = ("with tracer.invoke(long):\n    a = {B}[1].output\n"
            "with tracer.invoke(pair):\n    b = {B}[1].output\n").format(**p)
    pair = [SHORT, PROMPTS[2]]
    ns = {"model": model, "long": PROMPT, "pair": pair}
    ii.trace(model, cell, namespace=ns)
    assert tuple(ns["b"].shape[:2]) == (2, 9)
    pos = ii.positions(model, pair)
    for row, text in enumerate(pair):
        close(pos.unpad(ns["b"], row)[None], seen_alone(model, text, block(p, 1)), text)


# -- errors: past the invoke's own prompt; values whose layout cannot be known --------------

@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry-run"])
@pytest.mark.parametrize("kind, body, line", [
    ("read", "x = {B}[1].output[0, 8]", 4),
    ("write", "{B}[1].output[:, 8] = 0", 4),
    ("pattern write", "{B}[1].{A}.pattern.output[:, :, 8] = 0", 4),
])
def test_a_position_past_the_invokes_own_prompt_names_its_length(model, kind, body, line,
                                                                  dry_run):
    """Position 8 exists in the batch (15 positions) but not in the 7-token prompt."""
    p = paths(model)
    cell = ("out = []\nfor p in prompts:\n    with tracer.invoke(p):\n"
            f"        {body.format(**p)}\n")
    ns = {"model": model, "prompts": PROMPTS[:3]}     # 15, 7 and 9 tokens
    with pytest.raises(SiteError, match=rf"^line {line}: position 8 is past the prompt.*"
                                        r"the prompt is 7 tokens long.*0\.\.6 \(or -7\.\.-1\)"):
        ii.trace(model, cell, namespace=ns, dry_run=dry_run)
    assert "x" not in ns and hook_count(model.module) == 0


def test_dry_run_shapes_are_each_invokes_own(model):
    p = paths(model)
    ns = {"model": model, "prompts": PROMPTS, "vec": vec(model)}
    body = ("pat = {B}[1].{A}.pattern.output\nh = {B}[1].output\n{B}[1].output[:, 2] = 0\n"
            "{B}[1].output += vec\nout.append((i, {U}.output))")
    heads = getattr(model.config, "num_attention_heads", None) or model.config.n_head
    layer = p["B"].removeprefix("model.") + "[1]"
    for form, cell in cells(body, p).items():
        result = ii.trace(model, cell, namespace=ns, dry_run=True)
        shapes = {}
        for site in result.graph.module_sites():
            shapes.setdefault(site.path, set()).update(v.shape for v in site.visits)
        assert shapes[layer] == {(1, n, width(model)) for n in LENGTHS}, form
        assert shapes[f"{layer}.{p['A']}.pattern"] == {(1, heads, n, n) for n in LENGTHS}, form
        assert "out" not in ns and "h" not in ns


class Scores(nn.Module):
    """A module of the user's whose output [batch, pos, pos] could be [batch, pos, features]."""

    def forward(self, h):
        return h @ h.transpose(1, 2)


class WithScores(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.scores = inner, Scores()

    def forward(self, h):
        self.scores(h)
        return self.inner(h)


@pytest.fixture
def scored(demo):
    model = ii.wrap(tiny_model("llama", len(demo.tokenizer)), demo.tokenizer)
    layer = model.module.model.layers[1]
    layer.mlp = WithScores(layer.mlp)
    return model


def test_a_value_whose_positions_cannot_be_known_is_a_clear_error(scored):
    cell = ("out = []\nfor p in prompts:\n    with tracer.invoke(p):\n"
            "        out.append(model.model.layers[1].mlp.scores.output[0, 2])\n")
    with pytest.raises(SiteError, match=r"^line 4: `model.layers\[1\].mlp.scores.output` is a "
                                        r"tensor of shape \[1, 15, 15\].*not known \(dimensions "
                                        r"1 and 2 both have 15 entries\).*7 tokens"):
        ii.trace(scored, cell, namespace={"model": scored, "prompts": PROMPTS})
    assert hook_count(scored.module) == 0


def test_the_same_value_reads_when_the_prompts_have_one_length(scored):
    """Nothing is cut when every invoke is as long as the batch: no question to answer."""
    cell = ("out = []\nfor p in prompts:\n    with tracer.invoke(p):\n"
            "        out.append(model.model.layers[1].mlp.scores.output)\n"
            "        h = model.model.layers[1].mlp.output\n")
    ns = {"model": scored, "prompts": [PROMPT, PROMPT.replace("store", "park")]}
    ii.trace(scored, cell, namespace=ns)
    for got, text in zip(ns["out"], ns["prompts"]):
        close(got, seen_alone(scored, text, "model.model.layers.1.mlp.scores"), text)


@pytest.mark.parametrize("grad", [False, True], ids=["no grad", "grad"])
def test_the_longest_invoke_reads_it_and_a_shorter_one_reads_its_neighbours(scored, grad):
    """Only the shorter invoke's read of that one value is refused; its module's output
    ([batch, pos, 32]) reads as usual."""
    cell = ("with tracer.invoke(a):\n    s = model.model.layers[1].mlp.scores.output\n"
            "with tracer.invoke(b):\n    h = model.model.layers[1].mlp.output\n")
    ns = {"model": scored, "a": PROMPT, "b": SHORT}
    ii.trace(scored, cell, namespace=ns, grad=grad)
    close(ns["s"].detach(), seen_alone(scored, PROMPT, "model.model.layers.1.mlp.scores"), "scores")
    close(ns["h"].detach(), seen_alone(scored, SHORT, "model.model.layers.1.mlp"), "mlp")


@pytest.mark.parametrize("grad", [False, True], ids=["no grad", "grad"])
@pytest.mark.parametrize("access", ["read", "write"])
def test_only_the_shorter_invokes_touch_of_that_value_is_refused(scored, grad, access):
    """The longest invoke reads it; the shorter one's read or write is the error, on its
    line (with --grad too, where each invoke's part is split when the module runs)."""
    touch = ("x = model.model.layers[1].mlp.scores.output[0, 1]" if access == "read"
             else "model.model.layers[1].mlp.scores.output[:, 1] = 0")
    cell = ("with tracer.invoke(a):\n    s = model.model.layers[1].mlp.scores.output\n"
            f"with tracer.invoke(b):\n    h = model.model.layers[0].output\n    {touch}\n")
    with pytest.raises(SiteError, match=r"^line 5: `model.layers\[1\].mlp.scores.output` is a "
                                        r"tensor of shape \[1, 15, 15\].*7 tokens"):
        ii.trace(scored, cell, namespace={"model": scored, "a": PROMPT, "b": SHORT}, grad=grad)
    assert hook_count(scored.module) == 0


# -- --grad ---------------------------------------------------------------------------------

GRAD_AFTER = ("sum(l[0, -1, 5] for _, l in lg).backward()\n"
              "out = [(i, h.grad) for i, h in hs]\n")


@pytest.mark.parametrize("form", ["explicit", "loop"])
@pytest.mark.parametrize("write", [False, True], ids=["read", "write at position 1"])
def test_grad_reaches_each_invokes_own_positions(model, form, write):
    p = paths(model)
    body = (("{B}[1].output[:, 1] = 0\n" if write else "")
            + "h = {B}[2].output\nh.retain_grad()\nhs.append((i, h))\nlg.append((i, {U}.output))")
    ns = {"model": model, "prompts": PROMPTS}
    ii.trace(model, cells(body, p, after=GRAD_AFTER)[form], namespace=ns, grad=True)
    for i, (got, text) in enumerate(zip(each(ns), PROMPTS)):
        seen = {}
        post = [(block(p, 2), lambda m, a, o: seen.setdefault("h", o))]
        if write:
            post.insert(0, (block(p, 1), edit(lambda o: o.__setitem__((slice(None), 1), 0))))
        logits = run_alone(model, text, post=post, grad=True)
        (want,) = torch.autograd.grad(logits[0, -1, 5], seen["h"])
        close(got, want, f"grad, {form}, prompt {i}")
    assert all(p.grad is None for p in model.module.parameters())


# -- --generate: later steps see keys of the invoke's own prompt and the new tokens ---------

def recording_attention(records: list):
    def attend(module, q, k, v, mask, scaling=None, **kwargs):
        repeat = q.shape[1] // k.shape[1]
        keys, values = k.repeat_interleave(repeat, 1), v.repeat_interleave(repeat, 1)
        scale = scaling if scaling is not None else q.shape[-1] ** -0.5
        scores = q @ keys.transpose(-1, -2) * scale + (0 if mask is None else mask)
        pattern = scores.softmax(-1)
        if module.layer_idx == 1:
            records.append(pattern)
        return (pattern @ values).transpose(1, 2), pattern
    return attend


def generate_alone(model, p, text, coef, v, steps):
    """Generation of ``text`` alone: position 1 of block 1 zeroed in the prompt's forward,
    the last position steered at every step; block 1's patterns recorded."""
    prompt, records = ids(model, text), []

    def steer(mod, args, out):
        out = out.clone()
        if out.shape[1] > 1:
            out[:, 1] = 0
        out[:, -1] += coef * v
        return out

    AttentionInterface.register("recording", recording_attention(records))
    AttentionMaskInterface.register("recording", eager_mask)
    before = model.module.config._attn_implementation
    model.module.set_attn_implementation("recording")
    handle = module(model, block(p, 1)).register_forward_hook(steer)
    try:
        sequences, logits = greedy_generate(model, prompt, steps)
    finally:
        handle.remove()
        model.module.set_attn_implementation(before)
    return sequences[0], logits[0], records


@pytest.mark.parametrize("form", ["explicit", "loop"])
def test_generation_steps_see_the_invokes_own_prompt_and_new_tokens(model, form):
    p, v = paths(model), vec(model)
    body = ("{B}[1].output[:, 1] = 0\n"
            "for step in tracer.steps():\n"
            "    {B}[1].output[:, -1] += (i + 1) * vec\n"
            "    hs.append((i, step, {B}[1].{A}.pattern.output))\n"
            "    lg.append((i, step, {U}.output[:, -1]))\n"
            "out.append((i, tracer.output))\n")
    prompts = PROMPTS[:3]
    ns = {"model": model, "prompts": prompts, "vec": v}
    ii.trace(model, cells(body, p, n=3)[form], namespace=ns, generate=3, ignore_eos=True)
    for i, text in enumerate(prompts):
        tokens, scores, patterns = generate_alone(model, p, text, i + 1, v, 3)
        assert torch.equal(dict(ns["out"])[i][0], tokens), f"tokens of prompt {i}"
        logits = torch.cat([x for j, _, x in sorted(ns["lg"], key=lambda t: t[:2]) if j == i])
        close(logits, scores, f"logits of prompt {i}")
        got = [x for j, _, x in sorted(ns["hs"], key=lambda t: t[:2]) if j == i]
        assert [tuple(x.shape[2:]) for x in got] == [(LENGTHS[i], LENGTHS[i]),
                                                     (1, LENGTHS[i] + 1), (1, LENGTHS[i] + 2)]
        for step, (x, want) in enumerate(zip(got, patterns)):
            close(x, want, f"pattern of prompt {i} at step {step}")


# -- the same through %%trace ---------------------------------------------------------------

def test_shell_reads_and_writes_from_the_start_of_each_prompt(shell, demo):
    shell.user_ns["prompts"] = PROMPTS
    shell.run_cell("%%trace model\n"
                   "outs = []\n"
                   "for p in prompts:\n"
                   "    with tracer.invoke(p):\n"
                   "        model.transformer.h[1].output[:, 1] = 0\n"
                   "        outs.append(model.transformer.h[2].output[0, 2])\n")
    p = paths(demo)
    for got, text in zip(shell.user_ns["outs"], PROMPTS):
        seen = {}
        run_alone(demo, text, post=[(block(p, 1), edit(lambda o: o.__setitem__(
            (slice(None), 1), 0))), (block(p, 2), lambda m, a, o: seen.setdefault("h", o))])
        close(got, seen["h"][0, 2], text)


def test_shell_past_the_prompt_names_the_invokes_length(shell, demo):
    shell.user_ns["prompts"] = PROMPTS[:3]
    with pytest.raises(InterventionError, match=r"line 5: position 8 is past the prompt.*"
                                                r"the prompt is 7 tokens long"):
        shell.run_cell("%%trace model\n"
                       "outs = []\n"
                       "for p in prompts:\n"
                       "    with tracer.invoke(p):\n"
                       "        outs.append(model.transformer.h[1].output[0, 8])\n")
    assert "outs" not in shell.user_ns


# -- an index into a list several invokes fill, taken during the forward --------------------

def layer_outputs(demo, text):
    seen = {}
    handles = [b.register_forward_hook(lambda m, a, o, i=i: seen.setdefault(i, o))
               for i, b in enumerate(demo.module.transformer.h)]
    try:
        run_alone(demo, text)
    finally:
        for h in handles:
            h.remove()
    return seen


@pytest.mark.parametrize("form", ["loop", "explicit"])
def test_an_index_taken_during_the_forward_that_would_point_elsewhere_is_an_error(demo, form):
    """Layer 3's invoke comes first but appends last: when layer 0's invoke takes
    `len(outs)`, it is 1, but in invoke order its item comes after layer 3's (2)."""
    if form == "loop":
        cell = ("outs = []\nidx = {}\nfor layer in [3, 0]:\n    with tracer.invoke(a):\n"
                "        outs.append(model.transformer.h[layer].output[0, -1])\n"
                "        idx[layer] = len(outs) - 1\n")
        line = 6
    else:
        cell = "outs = []\nidx = {}\n" + "".join(
            f"with tracer.invoke(a):\n    outs.append(model.transformer.h[{layer}].output[0, -1])\n"
            f"    idx[{layer}] = len(outs) - 1\n" for layer in (3, 0))
        line = 8
    ns = {"model": demo, "a": PROMPT}
    with pytest.raises(InterventionError, match=rf"^line {line}: `len\(...\)` of a list "
                                                r"several invokes append to was 1 .* it is 2 "
                                                r".*res\[layer\]"):
        ii.trace(demo, cell, namespace=ns)
    assert "idx" not in ns and "outs" not in ns and hook_count(demo.module) == 0


def test_an_index_taken_in_invoke_order_is_right(demo):
    """Invokes that append in the order they are written: each index is its own item."""
    cell = ("outs = []\nidx = {}\nfor layer in [0, 2, 3]:\n    with tracer.invoke(a):\n"
            "        outs.append(model.transformer.h[layer].output[0, -1])\n"
            "        idx[layer] = len(outs) - 1\n        x = model.lm_head.output\n")
    ns = {"model": demo, "a": PROMPT}
    ii.trace(demo, cell, namespace=ns)
    seen = layer_outputs(demo, PROMPT)
    assert ns["idx"] == {0: 0, 2: 1, 3: 2}
    for layer in (0, 2, 3):
        close(ns["outs"][ns["idx"][layer]], seen[layer][0, -1], f"layer {layer}")


def test_len_of_a_list_the_invoke_fills_alone_is_left_alone(demo):
    cell = ("sizes = []\nfor layer in [3, 0]:\n    with tracer.invoke(a):\n        mine = []\n"
            "        mine.append(model.transformer.h[layer].output[0, -1])\n"
            "        sizes.append(len(mine))\n")
    ns = {"model": demo, "a": PROMPT}
    ii.trace(demo, cell, namespace=ns)
    assert ns["sizes"] == [1, 1]
