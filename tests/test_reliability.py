"""Nothing lost under failures at every stage, interrupts, over-long prompts and long
sessions: no name published, no hook left (forward, pre, backward), weights unchanged,
grad mode restored, the next cell the same as on a fresh model."""

from __future__ import annotations

import gc

import pytest
import torch

import ipy_intervene as ii
from ipy_intervene.errors import InputError, InterventionError
from conftest import CORRUPT, PROMPT, checksum, hook_count

GOOD = "logits = model.lm_head.output"


@pytest.fixture
def intact(demo):
    """Yields the demo model; afterwards asserts it is as a fresh one would be."""
    weights = checksum(demo.module)
    reference = ii.trace(demo, GOOD, PROMPT, namespace={"model": demo}).names["logits"]
    grad_mode = torch.is_grad_enabled()
    yield demo
    assert hook_count(demo.module) == 0
    assert checksum(demo.module) == weights
    assert torch.is_grad_enabled() == grad_mode
    again = ii.trace(demo, GOOD, PROMPT, namespace={"model": demo}).names["logits"]
    assert torch.equal(again, reference)


@pytest.mark.parametrize("source,line", [
    ("x = 1 / 0\nh = model.transformer.h[0].output", 1),                     # before the forward
    ("h = model.transformer.h[1].output\nx = 1 / 0\nl = model.lm_head.output", 2),  # inside
    ("l = model.lm_head.output\nx = 1 / 0", 2),                               # after the last site
    ("with tracer.invoke(p):\n    h = model.transformer.h[0].output\n    {}['missing']", 3),
])
def test_user_exceptions_at_every_stage(intact, source, line):
    ns = {"model": intact, "p": PROMPT, "keep": 1}
    input_ = _no_input() if "invoke" in source else PROMPT
    with pytest.raises((ZeroDivisionError, KeyError)) as info:
        ii.trace(intact, source, input_, namespace=ns)
    assert any(f"line {line}" in note for note in getattr(info.value, "__notes__", []))
    assert ns == {"model": intact, "p": PROMPT, "keep": 1}


def _no_input():
    from ipy_intervene.tracing.trace import NO_INPUT

    return NO_INPUT


@pytest.mark.parametrize("value,words", [
    ("'a string'", ["str"]),
    ("torch.zeros(1, 15, 128, dtype=torch.complex64)", ["complex"]),
])
def test_writes_of_the_wrong_kind_name_the_line(intact, value, words):
    ns = {"model": intact, "torch": torch}
    with pytest.raises(InterventionError) as info:
        ii.trace(intact, f"x = 1\nmodel.transformer.h[1].output = {value}", PROMPT, namespace=ns)
    assert info.value.line == 2
    assert all(w in str(info.value) for w in words), str(info.value)
    assert set(ns) == {"model", "torch"}


def test_keyboard_interrupt_inside_the_models_forward(intact):
    """An interrupt raised by the model itself (here a user's hook), mid-forward."""
    def interrupt(module, args, output):
        raise KeyboardInterrupt

    handle = intact.module.transformer.h[2].register_forward_hook(interrupt)
    ns = {"model": intact}
    try:
        with pytest.raises(KeyboardInterrupt):
            ii.trace(intact, "a = model.transformer.h[1].output\nb = model.lm_head.output",
                     PROMPT, namespace=ns)
    finally:
        handle.remove()
    assert ns == {"model": intact}


def test_over_long_prompts_are_an_input_error(intact):
    long = " ".join(["drink"] * 80)
    with pytest.raises(InputError, match="81 tokens long; this model has 64 positions"):
        ii.trace(intact, GOOD, long, namespace={"model": intact})
    with pytest.raises(InputError, match="this model has 64 positions"):
        ii.patch_sweep(intact, long, long, ii.logit_diff("Mary", "John"))


def test_sweep_interrupted_in_a_block_call(intact, monkeypatch):
    from ipy_intervene.sweep import blocks

    original, calls = blocks.BlockCaller.__call__, []

    def flaky(self, layer, hidden):
        calls.append(layer)
        if len(calls) == 7:
            raise KeyboardInterrupt
        return original(self, layer, hidden)

    monkeypatch.setattr(blocks.BlockCaller, "__call__", flaky)
    with pytest.raises(KeyboardInterrupt):
        ii.patch_sweep(intact, PROMPT, CORRUPT, ii.logit_diff("Mary", "John"), site="mlp_out")


def live_tensors() -> int:
    gc.collect()
    return sum(1 for obj in gc.get_objects() if issubclass(type(obj), torch.Tensor))


def test_many_cells_and_sweeps_do_not_leak(intact, shell):
    """A short soak (benchmarks/soak.py runs the long one): live tensors stay flat."""
    shell.user_ns.update(clean=PROMPT, corrupt=CORRUPT)
    cell = (f'%%trace model "{PROMPT}"\nh = model.transformer.h[2].output\n'
            "model.transformer.h[3].mlp.output[:, -1] *= 0.5\nlogits = model.lm_head.output\n")
    sweep = ('%patch_sweep model --clean clean --corrupted corrupt '
             '--metric logit_diff("Mary", "John") --quiet')
    for _ in range(5):  # warm caches
        shell.run_cell(cell)
        shell.run_cell(sweep)
    start = live_tensors()
    for i in range(60):
        shell.run_cell(cell)
        if i % 6 == 0:
            shell.run_cell(sweep)
    assert live_tensors() - start <= 10
    assert hook_count(intact.module) == 0


def test_hasattr_and_getattr_defaults_work_on_envoys(demo):
    assert not hasattr(demo.transformer, "nonexistent")
    assert getattr(demo.transformer.h[0], "nope", 3) == 3
    with pytest.raises(ii.InterventionError, match="Did you mean `h`"):
        demo.transformer.hh
