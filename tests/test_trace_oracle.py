"""%%trace against an oracle written with plain PyTorch hooks, on GPT-2, NeoX and Llama shapes."""

from __future__ import annotations


import torch

import ipy_intervene as ii
from ipy_intervene.tracing.trace import NO_INPUT
from conftest import CORRUPT, LAYERS, PROMPT, SHORT, UNEMBED, hooks, layers


def paths(arch: str) -> dict[str, str]:
    top, name = LAYERS[arch]
    return {"L": f"model.{top}.{name}", "U": f"model.{UNEMBED[arch]}"}


def run(model, arch, source, input=NO_INPUT, **kw):
    ns = {"model": model}
    ii.trace(model, source.format(**paths(arch)), input, namespace=ns, **kw)
    return ns


def ids(model, text):
    return model.tokenizer(text, return_tensors="pt").input_ids


def unembed(model, arch):
    return getattr(model.module, UNEMBED[arch])


@torch.no_grad()
def test_reads_equal_hooked_forward(arch_model):
    arch, model = arch_model
    ns = run(model, arch, "mlp = {L}[1].mlp.output\nh = {L}[1].output\nlogits = {U}.output",
             PROMPT)
    seen = {}
    blk = layers(model, arch)[1]
    with hooks((blk, lambda m, a, o: seen.__setitem__("h", o)),
               (blk.mlp, lambda m, a, o: seen.__setitem__("mlp", o))):
        logits = model.module(ids(model, PROMPT)).logits
    assert torch.equal(ns["h"], seen["h"])
    assert torch.equal(ns["mlp"], seen["mlp"])
    assert torch.equal(ns["logits"], logits)


@torch.no_grad()
def test_assignment_replaces_output(arch_model):
    arch, model = arch_model
    ns = run(model, arch, "{L}[0].output = {L}[0].output * 2\nlogits = {U}.output", PROMPT)
    with hooks((layers(model, arch)[0], lambda m, a, o: o * 2)):
        expected = model.module(ids(model, PROMPT)).logits
    assert torch.equal(ns["logits"], expected)


@torch.no_grad()
def test_inplace_edit_changes_the_running_forward(arch_model):
    arch, model = arch_model
    ns = run(model, arch, "{L}[1].mlp.output[:, -1] = 0\nlogits = {U}.output", PROMPT)

    def zero_last(m, a, o):
        o = o.clone()
        o[:, -1] = 0
        return o

    with hooks((layers(model, arch)[1].mlp, zero_last)):
        expected = model.module(ids(model, PROMPT)).logits
    assert torch.equal(ns["logits"], expected)
    plain = model.module(ids(model, PROMPT)).logits
    assert not torch.equal(ns["logits"], plain)


@torch.no_grad()
def test_augmented_assignment_and_input_write(arch_model):
    arch, model = arch_model
    ns = run(model, arch, "{L}[2].output += 1.5\nlogits = {U}.output", PROMPT)
    with hooks((layers(model, arch)[2], lambda m, a, o: o + 1.5)):
        expected = model.module(ids(model, PROMPT)).logits
    assert torch.equal(ns["logits"], expected)

    ns = run(model, arch, "{L}[2].mlp.input = {L}[2].mlp.input * 0.5\nlogits = {U}.output", PROMPT)
    handle = layers(model, arch)[2].mlp.register_forward_pre_hook(lambda m, a: (a[0] * 0.5,))
    try:
        expected = model.module(ids(model, PROMPT)).logits
    finally:
        handle.remove()
    assert torch.equal(ns["logits"], expected)


@torch.no_grad()
def test_skip_uses_the_given_value(arch_model):
    arch, model = arch_model
    ns = run(model, arch, "x = {L}[1].input\n{L}[1].skip(x)\nlogits = {U}.output", PROMPT)
    with hooks((layers(model, arch)[1], lambda m, a, o: a[0])):
        expected = model.module(ids(model, PROMPT)).logits
    assert torch.equal(ns["logits"], expected)


@torch.no_grad()
def test_skipped_module_does_not_run(demo):
    calls = []
    handle = demo.module.transformer.h[1].mlp.register_forward_hook(lambda *a: calls.append(1))
    try:
        run(demo, "gpt2", "{L}[1].skip({L}[1].input)\nlogits = {U}.output", PROMPT)
    finally:
        handle.remove()
    assert calls == []


@torch.no_grad()
def test_adhoc_module_call_runs_the_module(arch_model):
    arch, model = arch_model
    ns = run(model, arch, "h = {L}[-1].output\nfinal = {U}(h)\nlogits = {U}.output", PROMPT)
    assert torch.equal(ns["final"], unembed(model, arch)(ns["h"]))


@torch.no_grad()
def test_padded_invokes_match_each_prompt_alone(arch_model):
    arch, model = arch_model
    ns = {"model": model, "long": PROMPT, "short": SHORT}
    ii.trace(model, ("with tracer.invoke(long):\n    a = {U}.output\n"
                     "with tracer.invoke(short):\n    b = {U}.output\n    hb = {L}[1].output"
                     ).format(**paths(arch)), namespace=ns)
    alone_long = model.module(ids(model, PROMPT)).logits
    seen = {}
    with hooks((layers(model, arch)[1], lambda m, a, o: seen.__setitem__("h", o))):
        alone_short = model.module(ids(model, SHORT)).logits
    n = alone_short.shape[1]
    assert ns["a"].shape == alone_long.shape
    torch.testing.assert_close(ns["a"], alone_long, atol=1e-5, rtol=0)
    torch.testing.assert_close(ns["b"][:, -n:], alone_short, atol=1e-5, rtol=0)
    torch.testing.assert_close(ns["hb"][:, -n:], seen["h"], atol=1e-5, rtol=0)


@torch.no_grad()
def test_cross_invoke_patching_in_one_forward(arch_model):
    arch, model = arch_model
    ns = {"model": model, "clean_prompt": PROMPT, "corrupt_prompt": CORRUPT}
    ii.trace(model, ("with tracer.invoke(clean_prompt):\n    clean = {L}[1].output\n"
                     "with tracer.invoke(corrupt_prompt):\n    {L}[1].output[:, 8] = clean[:, 8]\n"
                     "    patched = {U}.output").format(**paths(arch)), namespace=ns)
    seen = {}
    with hooks((layers(model, arch)[1], lambda m, a, o: seen.__setitem__("clean", o))):
        model.module(ids(model, PROMPT))

    def patch(m, a, o):
        o = o.clone()
        o[:, 8] = seen["clean"][:, 8]
        return o

    with hooks((layers(model, arch)[1], patch)):
        expected = model.module(ids(model, CORRUPT)).logits
    torch.testing.assert_close(ns["patched"], expected, atol=1e-5, rtol=0)


@torch.no_grad()
def test_values_flow_to_an_earlier_invoke(demo):
    ns = {"model": demo, "clean_prompt": PROMPT, "corrupt_prompt": CORRUPT}
    ii.trace(demo, "with tracer.invoke(corrupt_prompt):\n"
                   "    model.transformer.h[2].output = clean\n"
                   "    patched = model.lm_head.output\n"
                   "with tracer.invoke(clean_prompt):\n"
                   "    clean = model.transformer.h[2].output\n", namespace=ns)
    clean = {}
    with hooks((demo.module.transformer.h[2], lambda m, a, o: clean.__setitem__("h", o))):
        demo.module(ids(demo, PROMPT))
    with hooks((demo.module.transformer.h[2], lambda m, a, o: clean["h"])):
        expected = demo.module(ids(demo, CORRUPT)).logits
    torch.testing.assert_close(ns["patched"], expected, atol=1e-5, rtol=0)


@torch.no_grad()
def test_generation_steps_match_hooked_generate(arch_model):
    arch, model = arch_model
    ns = run(model, arch, "logits = []\nfor step in tracer.steps():\n"
                          "    if step == 1:\n        {L}[1].mlp.output[:] = 0\n"
                          "    logits.append({U}.output[:, -1])\n"
                          "tokens = tracer.output", PROMPT, generate=3)
    seen, step = [], {"n": -1}

    def count(m, a, kw):
        step["n"] += 1

    def zero_at_step_1(m, a, o):
        return torch.zeros_like(o) if step["n"] == 1 else o

    handle = model.module.register_forward_pre_hook(count, with_kwargs=True)
    try:
        with hooks((unembed(model, arch), lambda m, a, o: seen.append(o[:, -1])),
                   (layers(model, arch)[1].mlp, zero_at_step_1)):
            enc = model.tokenizer(PROMPT, return_tensors="pt")
            tokens = model.module.generate(**enc, max_new_tokens=3, do_sample=False,
                                           pad_token_id=model.tokenizer.pad_token_id)
    finally:
        handle.remove()
    assert torch.equal(ns["tokens"], tokens)
    assert len(ns["logits"]) == 3
    for ours, theirs in zip(ns["logits"], seen):
        assert torch.equal(ours, theirs)


def test_gradients_match_autograd_by_hand(arch_model):
    arch, model = arch_model
    ns = run(model, arch, "h = {L}[1].output\nh.retain_grad()\nlogits = {U}.output\n"
                          "loss = logits[0, -1].log_softmax(-1)[5]\nloss.backward()\ngrad = h.grad",
             PROMPT, grad=True)
    seen = {}

    def keep(m, a, o):
        o.retain_grad()
        seen["h"] = o

    with hooks((layers(model, arch)[1], keep)):
        logits = model.module(ids(model, PROMPT)).logits
    logits[0, -1].log_softmax(-1)[5].backward()
    assert ns["grad"] is not None
    assert torch.equal(ns["grad"], seen["h"].grad)
    model.module.zero_grad(set_to_none=True)


@torch.no_grad()
def test_control_flow_on_real_values(demo):
    src = ("h = model.transformer.h[0].output\nnorms = []\n"
           "for l in range(4):\n    x = model.transformer.h[l].output\n"
           "    norms.append(float(x[0, -1].norm()))\n"
           "    if norms[-1] > 1e9:\n        model.transformer.h[l].output[:] = 0\n"
           "logits = model.lm_head.output")
    ns = {"model": demo}
    result = ii.trace(demo, src, PROMPT, namespace=ns)
    hs = []
    with hooks(*[(blk, lambda m, a, o: hs.append(o)) for blk in demo.module.transformer.h]):
        expected = demo.module(ids(demo, PROMPT)).logits
    assert ns["norms"] == [float(h[0, -1].norm()) for h in hs]
    assert torch.equal(ns["logits"], expected)
    loop = next(r for r in result.graph.regions if r.kind == "for")
    branch = next(r for r in result.graph.regions if r.kind == "if")
    assert (loop.entered, branch.entered, branch.taken) == (4, 4, 0)


@torch.no_grad()
def test_design_example_reads_layers_in_a_comprehension(demo):
    src = ("h = model.transformer.h[2].output\n"
           "if h[0, -1].norm() > 0:\n    model.transformer.h[3].mlp.output[:, -1] = 0\n"
           "acts = [model.transformer.h[l].output for l in range(4)]\n"
           "logits = model.lm_head.output")
    ns = {"model": demo}
    ii.trace(demo, src, PROMPT, namespace=ns)
    hs = []

    def zero_last(m, a, o):
        o = o.clone()
        o[:, -1] = 0
        return o

    with hooks(*[(blk, lambda m, a, o: hs.append(o)) for blk in demo.module.transformer.h],
               (demo.module.transformer.h[3].mlp, zero_last)):
        expected = demo.module(ids(demo, PROMPT)).logits
    assert all(torch.equal(a, b) for a, b in zip(ns["acts"], hs))
    assert torch.equal(ns["logits"], expected)


@torch.no_grad()
def test_stop_ends_the_forward_early(demo):
    calls = []
    handle = demo.module.lm_head.register_forward_hook(lambda *a: calls.append(1))
    try:
        ns = run(demo, "gpt2", "h = {L}[0].output\ntracer.stop()", PROMPT)
    finally:
        handle.remove()
    assert calls == [] and ns["h"].shape[1] == ids(demo, PROMPT).shape[1]


def test_gradients_reach_every_invoke(arch_model):
    """nnsight's attribution-patching habit: clean and corrupted invokes in one --grad trace;
    the corrupted invoke's .grad equals autograd on the same batched forward by hand."""
    arch, model = arch_model
    ns = {"model": model, "clean": PROMPT, "corrupt": CORRUPT}
    source = ("with tracer.invoke(clean):\n    a = {L}[1].output\n    a.retain_grad()\n"
              "with tracer.invoke(corrupt):\n    b = {L}[1].output\n    b.retain_grad()\n"
              "    logits = {U}.output\n"
              "    (logits[:, -1, 5] - logits[:, -1, 6]).sum().backward()\n")
    ii.trace(model, source.format(**paths(arch)), namespace=ns, grad=True)
    seen = {}

    def split(m, args, out):
        seen["a"], seen["b"] = out[:1], out[1:]
        for part in seen.values():
            part.retain_grad()
        return torch.cat([seen["a"], seen["b"]])

    with hooks((layers(model, arch)[1], split)):
        logits = model.module(model.tokenizer([PROMPT, CORRUPT], return_tensors="pt").input_ids).logits
    (logits[1:, -1, 5] - logits[1:, -1, 6]).sum().backward()
    model.module.zero_grad(set_to_none=True)
    assert ns["b"].grad is not None and ns["b"].grad.abs().sum() > 0
    assert torch.equal(ns["b"].grad, seen["b"].grad)
    assert torch.equal(ns["a"].grad, seen["a"].grad)  # zeros: rows do not mix


@torch.no_grad()
def test_sites_through_loop_variables_and_functions(arch_model):
    """Envoys the compiler cannot see (a comprehension's variable, a function's argument)
    read and write the same values as the sites it can."""
    arch, model = arch_model
    ns = {"model": model, "double": lambda layer: setattr(layer, "output", layer.output * 2)}
    source = ("double({L}[0])\nacts = [layer.output for layer in {L}]\n"
              "logits = {U}.output")
    ii.trace(model, source.format(**paths(arch)), PROMPT, namespace=ns)
    seen = []
    blocks = layers(model, arch)
    with hooks((blocks[0], lambda m, a, o: o * 2),
               *[(b, lambda m, a, o: seen.append(o)) for b in blocks]):
        logits = model.module(ids(model, PROMPT)).logits
    assert len(ns["acts"]) == len(seen)
    for ours, theirs in zip(ns["acts"], seen):
        assert torch.equal(ours, theirs)
    assert torch.equal(ns["logits"], logits)
