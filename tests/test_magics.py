"""%%trace through an InteractiveShell (the TestingShell pattern)."""

from __future__ import annotations

import re

import pytest
import torch
from IPython.core.error import UsageError

from ipy_intervene.errors import SiteError
from ipy_intervene.magics.command import TraceCommand
from ipy_intervene.tracing.trace import TraceResult
from conftest import PROMPT, hook_count


def test_trace_cell_publishes_real_tensors(shell):
    shell.run_cell(f'%%trace model "{PROMPT}"\n'
                   "h = model.transformer.h[2].output\n"
                   "model.transformer.h[3].mlp.output[:, -1] = 0\n"
                   "logits = model.lm_head.output\n")
    ns = shell.user_ns
    assert isinstance(ns["h"], torch.Tensor) and ns["h"].shape == (1, 15, 128)
    assert isinstance(ns["_trace"], TraceResult)
    assert set(ns["_trace"].names) == {"h", "logits"}
    assert "tracer" not in ns and "__ii__" not in ns


def test_invokes_out_and_inner_line_magics(shell):
    shell.user_ns.update(clean=PROMPT, corrupt=PROMPT.replace("John gave", "Mary gave"))
    shell.run_cell("%%trace model --out res\n"
                   "with tracer.invoke(clean):\n    c = model.transformer.h[1].output\n"
                   "with tracer.invoke(corrupt):\n    model.transformer.h[1].output = c\n"
                   "    patched = model.lm_head.output\n")
    assert shell.user_ns["res"] is shell.user_ns["_trace"]
    assert shell.user_ns["patched"].shape[0] == 1


def test_generate_option_returns_token_ids(shell):
    shell.run_cell(f'%%trace model "{PROMPT}" --generate 2\n'
                   "for step in tracer.steps():\n    last = model.lm_head.output[:, -1]\n"
                   "tokens = tracer.output\n")
    assert shell.user_ns["tokens"].shape == (1, 17)
    assert shell.user_ns["_trace"].steps == 2


def test_dry_run_does_not_run_the_model(shell, capsys):
    calls = []
    handle = shell.user_ns["model"].module.register_forward_hook(lambda *a: calls.append(1))
    try:
        shell.run_cell(f'%%trace model "{PROMPT}" --dry-run\nh = model.transformer.h[1].output\n')
    finally:
        handle.remove()
    assert calls == [] and "h" not in shell.user_ns
    assert "transformer.h[1].output" in capsys.readouterr().out
    assert shell.user_ns["_trace"].dry_run


def test_graph_option_displays_the_graph(shell, capsys):
    shell.run_cell(f'%%trace model "{PROMPT}" --graph\nh = model.transformer.h[1].output\n')
    out = capsys.readouterr().out
    assert "transformer.h[1].output" in out


def test_inner_line_magics_keep_working(shell):
    shell.run_cell(f'%%trace model "{PROMPT}"\nh = model.transformer.h[0].output\n%alias_magic ii_t time\n')
    assert "h" in shell.user_ns


def test_error_traceback_points_at_the_cell_line(shell):
    with pytest.raises(SiteError) as info:
        shell.run_cell(f'%%trace model "{PROMPT}"\nx = 1\nh = model.transformer.h[7].output\n')
    assert info.value.line == 3 and "has 4 layers" in str(info.value)
    with pytest.raises(ZeroDivisionError) as info:
        shell.run_cell(f'%%trace model "{PROMPT}"\nh = model.transformer.h[0].output\n1 / 0\n')
    exc = info.value
    text = "".join(shell.InteractiveTB.structured_traceback(type(exc), exc, exc.__traceback__))
    assert re.search(r"Cell In\[\d+\], line 3", _plain(text)), _plain(text)
    assert "1 / 0" in _plain(text)
    assert "h" not in shell.user_ns and hook_count(shell.user_ns["model"].module) == 0


@pytest.mark.parametrize("line, message", [
    ("%%trace", "needs a MODEL"),
    ("%%trace modl", "`modl` failed: NameError"),
    ("%%trace model 'x' --bogus 3", "unrecognized arguments"),
    ("%%trace model 'x' --generate zero", "invalid int value"),
    ("%%trace model 'x' --generate 0", "N >= 1"),
    ("%%trace 3", "expected an ii.Model"),
])
def test_bad_magic_lines_raise_one_line_usage_errors(shell, line, message):
    with pytest.raises(UsageError, match=message):
        shell.run_cell(f"{line}\nh = model.transformer.h[0].output\n")
    assert "h" not in shell.user_ns


def test_raw_torch_module_is_wrapped(shell):
    shell.user_ns["raw"] = shell.user_ns["model"].module
    shell.user_ns["torch"] = torch
    shell.run_cell("%%trace raw torch.tensor([[0, 5, 6]])\nh = raw.transformer.h[0].output\n")
    assert shell.user_ns["h"].shape == (1, 3, 128)


@pytest.mark.parametrize("line, expected", [
    ("model", ("model", None, "")),
    ('model "a b, c" --grad', ("model", '"a b, c"', "--grad")),
    ("mt.model [p1, p2] --generate 3 --out r", ("mt.model", "[p1, p2]", "--generate 3 --out r")),
    ("model {'input_ids': ids} --quiet", ("model", "{'input_ids': ids}", "--quiet")),
    ("model x - -1", ("model", "x - -1", "")),
])
def test_magic_line_parsing(line, expected):
    cmd = TraceCommand.parse(line)
    assert (cmd.model, cmd.input, cmd.options) == expected


def test_help_is_the_manual(shell):
    doc = shell.find_cell_magic("trace").__doc__
    assert "--generate" in doc and "tracer.invoke" in doc and "In [3]" in doc


def _plain(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def test_graph_of_a_failing_cell_marks_the_failing_line(shell):
    shown = []
    shell.display_pub.publish = lambda data, **kw: shown.append(data)
    try:
        with pytest.raises(SiteError):
            shell.run_cell(f'%%trace model "{PROMPT}" --graph\n'
                           "a = model.transformer.h[1].output\n"
                           "b = model.transformer.h[9].output\n")
    finally:
        del shell.display_pub.publish
    (bundle,) = shown
    dot = bundle.get("image/svg+xml") or bundle["text/html"]
    assert "#d93025" in dot  # the red pen of the failing statement
    assert "a" not in shell.user_ns and "b" not in shell.user_ns


def _shown(shell, cell: str) -> list[str]:
    """The traceback lines IPython shows for the cell's error (its `showtraceback` path)."""
    with pytest.raises(Exception) as info:
        shell.run_cell(cell)
    exc = info.value
    assert hasattr(exc, "_render_traceback_"), "the magic must attach its short traceback"
    return exc._render_traceback_()


def test_a_failing_cell_shows_its_own_line_and_the_message_only(shell):
    shell.user_ns["torch"] = torch
    lines = _shown(shell, f'%%trace model "{PROMPT}"\nh = model.transformer.h[2].output\n'
                          "model.transformer.h[3].mlp.output[:, -1] = torch.zeros(3)\n")
    text = "\n".join(lines)
    assert len(lines) <= 6, text
    assert re.search(r"Cell In\[\d+\], line 3", text), text    # the editor's line: magic = 1
    assert "----> 3 model.transformer.h[3].mlp.output[:, -1] = torch.zeros(3)" in text
    assert "ValueMismatchError: line 3:" in text and "[1, 128]" in text
    assert "site-packages" not in text and "ipy_intervene/" not in text
    assert hook_count(shell.user_ns["model"].module) == 0 and "h" not in shell.user_ns


def test_a_users_own_exception_shows_the_line_it_was_raised_on(shell):
    text = "\n".join(_shown(shell, f'%%trace model "{PROMPT}"\n'
                                   "h = model.transformer.h[0].output\nx = h.foo\n"))
    assert "----> 3 x = h.foo" in text and "AttributeError" in text
    assert "nothing was published" in text and "site-packages" not in text


def test_a_sweep_error_is_its_message_without_the_engines_frames(shell):
    text = "\n".join(_shown(shell, '%patch_sweep model --clean "When Mary" --corrupted '
                                   '"When Mary and" --metric logit_diff("Mary", "John")'))
    assert "different token lengths" in text and "site-packages" not in text


def test_debug_brings_the_full_traceback_back(shell):
    import ipy_intervene as ii

    ii.debug(True)
    try:
        with pytest.raises(ZeroDivisionError) as info:
            shell.run_cell(f'%%trace model "{PROMPT}"\n1 / 0\n')
        assert not hasattr(info.value, "_render_traceback_")
    finally:
        ii.debug(False)


def test_trace_help_shows_the_cell_magic_usage(shell):
    from ipy_intervene.magics.trace_magic import TraceMagics

    doc = TraceMagics.trace.__doc__
    assert "  %%trace [--generate N]" in doc and "``" not in doc
