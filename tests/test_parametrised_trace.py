"""``%%trace ... --def NAME(ARGS)``: a trace cell as a function of the notebook; calls equal
plain hooks, publish into the result only, and errors name the cell's own lines."""

from __future__ import annotations

import inspect

import pytest
import torch
from IPython.core.error import UsageError

import ipy_intervene as ii
from ipy_intervene.errors import SiteError
from ipy_intervene.magics.trace_def import take_def
from tests.conftest import PROMPT, SHORT, checksum, hook_count, hooks

SCALE = "model.transformer.h[layer].mlp.output[:, -1] *= coef\nlogits = model.lm_head.output"


def by_hand(model, prompt, layer, coef):
    def scale(m, a, out):
        out = out.clone()
        out[:, -1] *= coef
        return out

    ids = model.tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad(), hooks((model.module.transformer.h[layer].mlp, scale)):
        return model.module(ids).logits


def test_def_binds_a_function_and_runs_nothing(shell, demo):
    shell.user_ns["prompt"] = PROMPT
    before = hook_count(demo.module)
    shell.user_ns.pop("_trace", None)
    shell.run_cell_magic("trace", "model prompt --def scale(coef, layer=1)", SCALE)
    fn = shell.user_ns["scale"]
    assert str(inspect.signature(fn)) == "(coef, layer=1)"
    assert "logits" not in shell.user_ns and "_trace" not in shell.user_ns
    assert hook_count(demo.module) == before and "scale(coef, layer=1)" in repr(fn)


def test_calls_equal_plain_hooks_and_publish_into_the_result(shell, demo):
    shell.user_ns["prompt"] = PROMPT
    shell.run_cell_magic("trace", "model prompt --def scale(coef, layer=1)", SCALE)
    weights = checksum(demo.module)
    results = shell.run_cell("[scale(c) for c in (0.0, 0.5, 2.0)] + [scale(3.0, layer=3)]")
    got = results.result
    for result, (coef, layer) in zip(got, [(0.0, 1), (0.5, 1), (2.0, 1), (3.0, 3)]):
        assert isinstance(result, ii.TraceResult)
        assert torch.equal(result.names["logits"], by_hand(demo, PROMPT, layer, coef))
    assert not torch.equal(got[0].names["logits"], got[2].names["logits"])
    assert "logits" not in shell.user_ns and checksum(demo.module) == weights


def test_input_may_use_the_arguments(shell, demo):
    shell.user_ns["prompts"] = [PROMPT, SHORT]
    shell.run_cell_magic("trace", "model prompts[i] --def run(i, coef=0.0, layer=2)", SCALE)
    short = shell.user_ns["run"](1)
    assert torch.equal(short.names["logits"], by_hand(demo, SHORT, 2, 0.0))


def test_a_latent_sweep_is_a_python_loop(shell, demo):
    shell.user_ns["prompt"] = PROMPT
    splice = ii.attach(demo, demo.transformer.h[2], ii.load_sae("demo"))
    try:
        shell.run_cell_magic("trace", "model prompt --def steer(coef, latent)",
                             "model.transformer.h[2].sae.latents.output[:, -1, latent] *= coef\n"
                             "logits = model.lm_head.output")
        steer = shell.user_ns["steer"]
        for latent, coef in [(43, 0.0), (50, 2.0)]:
            got = steer(coef, latent).names["logits"]
            sae, seen = splice.dictionary, {}

            def edit(m, a, out, latent=latent, coef=coef):
                x = out[0] if isinstance(out, tuple) else out
                lat = sae.encode(x)
                error = x - sae.decode(lat)
                lat[:, -1, latent] *= coef
                seen["moved"] = True
                new = sae.decode(lat) + error
                return (new, *out[1:]) if isinstance(out, tuple) else new

            ii.detach(demo)
            ids = demo.tokenizer(PROMPT, return_tensors="pt").input_ids
            with torch.no_grad(), hooks((demo.module.transformer.h[2], edit)):
                want = demo.module(ids).logits
            splice = ii.attach(demo, demo.transformer.h[2], sae)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
            assert seen["moved"]
    finally:
        ii.detach(demo)


def test_errors_name_the_cells_own_lines(shell, demo):
    shell.user_ns["prompt"] = PROMPT
    shell.run_cell_magic("trace", "model prompt --def f(coef, layer=1)",
                         "h = model.transformer.h[layer].output\nx = 1 / coef\n"
                         "logits = model.lm_head.output")
    f = shell.user_ns["f"]
    before, weights = hook_count(demo.module), checksum(demo.module)
    with pytest.raises(ZeroDivisionError) as err:
        f(0)
    shown = "\n".join(err.value._render_traceback_())
    assert "line 3" in shown and "x = 1 / coef" in shown  # the magic line is line 1
    with pytest.raises(SiteError, match="line 2: layer index 9 is past the end") as err:
        f(1.0, layer=9)
    assert "h = model.transformer.h[layer].output" in "\n".join(err.value._render_traceback_())
    with pytest.raises(TypeError, match=r"f\(coef, layer=1\)"):
        f(1.0, 2, 3)
    assert hook_count(demo.module) == before and checksum(demo.module) == weights
    assert "h" not in shell.user_ns and "x" not in shell.user_ns


def test_bad_definitions_are_usage_errors(shell):
    with pytest.raises(UsageError, match="NAME\\(ARGS\\)"):
        shell.run_cell_magic("trace", "model 'a' --def steer", "x = 1")
    with pytest.raises(UsageError, match="--graph"):
        shell.run_cell_magic("trace", "model 'a' --def g(x) --graph", "y = x")
    with pytest.raises(UsageError, match="\\*args"):
        shell.run_cell_magic("trace", "model 'a' --def g(*xs)", "y = 1")
    with pytest.raises(UsageError, match="default `nope` failed"):
        shell.run_cell_magic("trace", "model 'a' --def g(x=nope)", "y = 1")
    assert "steer" not in shell.user_ns and "g" not in shell.user_ns


def test_take_def_reads_nested_brackets():
    assert take_def("model p --def s(a, b=(1, [2])) --grad") == ("model p --grad",
                                                                 "s(a, b=(1, [2]))")
    assert take_def("model '--def x'") == ("model '--def x'", None)


MODULE = '''
import ipy_intervene as ii
from ipy_intervene.tracing.traced import traced

model = ii.load_model("demo")
PROMPTS = {prompts!r}


@traced(model, PROMPTS[0])
def scale(coef, layer=1):
    """Scale one MLP's output at the last position."""
    model.transformer.h[layer].mlp.output[:, -1] *= coef
    x = 1 / coef
    logits = model.lm_head.output


@traced(model, input=lambda i, **_: PROMPTS[i])
def read(i, layer=2):
    h = model.transformer.h[layer].output
'''


@pytest.fixture
def module(tmp_path, monkeypatch):
    import importlib

    (tmp_path / "traced_cells.py").write_text(MODULE.format(prompts=[PROMPT, SHORT]))
    monkeypatch.syspath_prepend(str(tmp_path))
    mod = importlib.import_module("traced_cells")
    yield mod
    import sys
    sys.modules.pop("traced_cells", None)


def test_a_traced_function_equals_plain_hooks(module):
    model = module.model
    for coef, layer in [(0.5, 1), (2.0, 3)]:
        result = module.scale(coef, layer=layer)
        assert torch.equal(result.names["logits"], by_hand(model, PROMPT, layer, coef))
    assert module.scale.__doc__.startswith("Scale one MLP") and not hasattr(module, "logits")
    h = module.read(1).names["h"]
    assert h.shape[1] == len(model.to_str_tokens(SHORT))


def test_a_traced_function_names_its_own_lines(module):
    before = hook_count(module.model.module)
    with pytest.raises(ZeroDivisionError) as err:
        module.scale(0.0)
    assert "line 13" in " ".join(getattr(err.value, "__notes__", []))  # `x = 1 / coef`
    with pytest.raises(SiteError, match="line 12: layer index 9 is past the end"):
        module.scale(1.0, layer=9)
    assert hook_count(module.model.module) == before


def test_traced_needs_source(demo):
    from ipy_intervene.errors import InputError
    from ipy_intervene.tracing.traced import traced

    with pytest.raises(InputError, match="not available"):
        traced(demo, PROMPT)(eval("lambda coef: None"))
