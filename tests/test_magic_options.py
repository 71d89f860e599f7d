"""%patch_sweep's option table, its returned result (shown once), and line expressions
evaluated in the notebook's live namespace."""

from __future__ import annotations

import gc
import inspect
import re
import weakref
from types import SimpleNamespace

import pytest
from IPython.core.error import UsageError
from IPython.utils.capture import capture_output

import ipy_intervene as ii
from ipy_intervene.magics import sweep_magic
from ipy_intervene.magics.command import EXPRESSION, FLAG, SWEEP_OPTIONS, WORD, SweepCommand
from ipy_intervene.magics.evaluate import evaluate
from conftest import CORRUPT, PROMPT

LINE = ('%patch_sweep model --clean clean --corrupted corrupt --metric logit_diff("Mary", "John")'
        " --layers [0] --positions [-1]")
LAMBDA = "%patch_sweep model --clean clean --corrupted corrupt --layers [0] --positions [-1]"


@pytest.fixture
def sweep_shell(shell):
    shell.user_ns.update(clean=PROMPT, corrupt=CORRUPT)
    yield shell
    for name in ("_sweep", "_", "__", "___"):
        shell.user_ns.pop(name, None)
    shell.last_execution_result = None


def _help(shell) -> str:
    return shell.object_inspect("%patch_sweep")["docstring"]


# -- one option table: parsing, the unknown-option check and the manual -------------------

def test_help_lists_every_option_the_parser_accepts(sweep_shell):
    doc = _help(sweep_shell)
    assert doc == sweep_shell.find_line_magic("patch_sweep").__doc__
    options = doc.split("\nOptions\n-------\n")[1].split("\n\n")[0]
    documented = re.findall(r"^  (--[a-z-]+)", options, flags=re.M)
    assert documented == [o.flag for o in SWEEP_OPTIONS.values()]
    assert "--noise-std SD" in options and "--noise-std SD" in doc.split("\n\n")[0]
    for option in SWEEP_OPTIONS.values():
        value = "" if option.kind == FLAG else " x"
        clean = "" if option.name == "clean" else "--clean c "
        command = SweepCommand.parse(f"m {clean}{option.flag}{value}")
        assert option.name in command.options


def test_every_option_but_out_and_quiet_is_a_patch_sweep_parameter():
    parameters = inspect.signature(ii.patch_sweep).parameters
    assert set(SWEEP_OPTIONS) - {"out", "quiet"} <= set(parameters)
    assert "noise_std" in SWEEP_OPTIONS


def test_unknown_option_lists_all_options(sweep_shell):
    with pytest.raises(UsageError) as info:
        sweep_shell.run_cell(LINE + " --noise-sd 0.5")
    message = str(info.value)
    assert "unknown option --noise-sd (did you mean --noise-std?)" in message
    assert all(option.flag in message for option in SWEEP_OPTIONS.values())
    assert "_sweep" not in sweep_shell.user_ns


def test_options_are_read_by_their_kind(sweep_shell, monkeypatch):
    calls = []
    monkeypatch.setattr(sweep_magic, "patch_sweep",
                        lambda model, clean, **kw: calls.append((clean, kw)) or SimpleNamespace())
    sweep_shell.user_ns["n"] = 2
    sweep_shell.run_cell("%patch_sweep model --clean clean --site 'mlp_out' --method noise "
                         "--subject clean.split()[1] --noise-std n / 4 --samples n + 1 "
                         "--out traced --quiet")
    ((clean, kwargs),) = calls
    assert clean == PROMPT
    assert kwargs == {"site": "mlp_out", "method": "noise", "subject": "Mary",
                      "noise_std": 0.5, "samples": 3}
    assert sweep_shell.user_ns["traced"] is sweep_shell.user_ns["_sweep"]
    assert {o.kind for o in SWEEP_OPTIONS.values()} >= {WORD, EXPRESSION, FLAG}


def test_the_examples_in_the_help_parse(sweep_shell):
    examples = re.findall(r"^In \[\d+\]: (?:\w+ = )?%patch_sweep (.*)$", _help(sweep_shell),
                          flags=re.M)
    assert len(examples) >= 3
    for line in examples:
        assert SweepCommand.parse(line).options["clean"]


# -- the result is returned, and shown once ---------------------------------------------------

def _count_displays(shell, cell: str) -> int:
    """Rich displays published while running ``cell``, plus data written as its Out[]."""
    written = []
    shell.displayhook.write_format_data = lambda data, md=None: written.append(data)
    try:
        with capture_output() as captured:
            shell.run_cell(cell)
    finally:
        del shell.displayhook.write_format_data
    assert "SweepResult(" not in captured.stdout
    return len(captured.outputs) + len(written)


def test_last_line_is_shown_once_and_is_the_cells_value(sweep_shell):
    assert _count_displays(sweep_shell, LINE) == 1
    result = sweep_shell.user_ns["_sweep"]
    assert isinstance(result, ii.SweepResult)
    assert sweep_shell.last_execution_result.result is result


def test_assigned_result_is_bound_and_shown_once(sweep_shell):
    assert _count_displays(sweep_shell, "r = " + LINE) == 1
    assert sweep_shell.user_ns["r"] is sweep_shell.user_ns["_sweep"]


@pytest.mark.parametrize("prefix", ["", "r = "])
def test_quiet_shows_nothing_and_still_returns(sweep_shell, prefix):
    assert _count_displays(sweep_shell, prefix + LINE + " --quiet") == 0
    assert isinstance(sweep_shell.user_ns["_sweep"], ii.SweepResult)
    if prefix:
        assert sweep_shell.user_ns["r"] is sweep_shell.user_ns["_sweep"]


def test_a_later_cell_shows_the_result_again(sweep_shell):
    sweep_shell.run_cell("r = " + LINE + " --quiet")
    assert _count_displays(sweep_shell, "r") == 1
    assert _count_displays(sweep_shell, "display(r)") == 1


# -- expressions see the live notebook namespace ----------------------------------------------

def test_metric_lambda_globals_are_the_notebook_namespace(sweep_shell):
    sweep_shell.run_cell("kept = []\n"
                         "def keep(f):\n    kept.append(f)\n    return f\n")
    sweep_shell.run_cell(LAMBDA + " --metric keep(lambda logits: logits[:, -1, 0]) --quiet")
    (metric,) = sweep_shell.user_ns["kept"]
    assert metric.__globals__ is sweep_shell.user_ns
    f = evaluate(sweep_shell, "lambda: clean", "INPUT", "%%trace")
    assert f.__globals__ is sweep_shell.user_ns and f() == PROMPT


def test_trace_input_is_evaluated_in_the_notebook(sweep_shell):
    sweep_shell.run_cell("kept = []\n"
                         "def keep(f):\n    kept.append(f)\n    return f\n")
    sweep_shell.run_cell("%%trace model keep(lambda: 0) and clean\n"
                         "h = model.transformer.h[0].output\n")
    assert sweep_shell.user_ns["h"].shape[:2] == (1, 15)
    assert sweep_shell.user_ns["kept"][0].__globals__ is sweep_shell.user_ns


def test_metric_lambda_sees_a_global_rebound_during_the_sweep(sweep_shell):
    sweep_shell.run_cell("calls = []\n"
                         "def later(logits):\n    calls.append('later')\n"
                         "    return logits[:, -1, 0]\n"
                         "def score(logits):\n    global score\n    calls.append('first')\n"
                         "    score = later\n    return logits[:, -1, 0]\n")
    sweep_shell.run_cell(LAMBDA + " --metric lambda logits: score(logits) --quiet")
    calls = sweep_shell.user_ns["calls"]
    assert calls[0] == "first" and len(calls) > 1 and set(calls[1:]) == {"later"}


def test_helpers_fill_in_only_names_the_notebook_does_not_define(sweep_shell):
    assert "logit_diff" not in sweep_shell.user_ns
    sweep_shell.run_cell(LINE + " --quiet")
    assert "logit_diff" not in sweep_shell.user_ns  # nothing leaks into the notebook
    sweep_shell.run_cell("used = []\n"
                         "def logit_diff(good, bad):\n    used.append((good, bad))\n"
                         "    return ii.logit_diff(good, bad)\n")
    sweep_shell.run_cell(LINE + " --quiet")
    assert sweep_shell.user_ns["used"] == [("Mary", "John")]
    helpers = {"prob": ii.prob}
    assert evaluate(sweep_shell, "prob", "--metric", "%patch_sweep", helpers) is ii.prob
    sweep_shell.user_ns["prob"] = "mine"
    assert evaluate(sweep_shell, "prob", "--metric", "%patch_sweep", helpers) == "mine"


def test_earlier_sweeps_are_freed_when_sweep_is_rebound(sweep_shell):
    line = LAMBDA + " --metric lambda logits: logits[:, -1, 0] - logits[:, -1, 1] --quiet"
    sweep_shell.run_cell(line)
    first = weakref.ref(sweep_shell.user_ns["_sweep"])
    for _ in range(19):
        sweep_shell.run_cell(line)
    gc.collect()
    assert first() is None
    assert isinstance(sweep_shell.user_ns["_sweep"], ii.SweepResult)
