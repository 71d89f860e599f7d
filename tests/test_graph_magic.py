"""``%attribution_graph`` through an InteractiveShell (the TestingShell pattern): it equals the
Python API, shows the view once, binds ``_graph`` and ``--out``, and bad lines are one-line
UsageErrors."""

from __future__ import annotations

import re

import pytest
import torch
from IPython.core.error import UsageError

import ipy_intervene as ii
from ipy_intervene.magics.graph_magic import GraphCommand
from tests.test_attribution_graph import PROMPTS, random_transcoders

IOI = PROMPTS[0]
LINE = f'%attribution_graph model "{IOI}" --transcoders tcs --target logit_diff("Mary", "John")'


@pytest.fixture
def graph_shell(shell):
    shell.user_ns["tcs"] = random_transcoders(4, 128, seed=5)
    shown: list = []
    shell.display_pub.publish = lambda data, **kw: shown.append(data)
    shell.user_ns["__shown"] = shown
    yield shell
    del shell.display_pub.publish


def test_the_magic_equals_the_python_api_and_binds_the_graph(graph_shell, demo):
    graph_shell.run_cell(LINE + " --out g --quiet")
    ns = graph_shell.user_ns
    g = ns["g"]
    assert g is ns["_graph"] and isinstance(g, ii.AttributionGraph)
    want = ii.attribution_graph(demo, IOI, ns["tcs"], target=ii.logit_diff("Mary", "John"))
    assert g.ids == want.ids and g.ids[-1] == "logit:diff"
    torch.testing.assert_close(g.adjacency, want.adjacency)
    assert ns["__shown"] == []


def test_the_view_is_shown_once_as_the_last_line_or_assigned(graph_shell):
    shown = graph_shell.user_ns["__shown"]
    graph_shell.run_cell(LINE + ' --node-threshold 0.5 --max-edges 50 --groups '
                         '{"the names": ["t1", "t3"]}')
    assert len(shown) == 1 and shown[0]["image/svg+xml"].startswith("<svg")
    assert ">the names</text>" in shown[0]["image/svg+xml"]
    assert "PrunedGraph(" in shown[0]["text/plain"]
    shown.clear()
    graph_shell.run_cell("g2 = " + LINE[1:].replace("attribution_graph", "%attribution_graph",
                                                    1))
    assert len(shown) == 1 and graph_shell.user_ns["g2"] is graph_shell.user_ns["_graph"]
    shown.clear()
    graph_shell.run_cell("_graph")  # a later cell shows it again
    assert len(shown) == 1


def test_demo_transcoders_examples_and_groups(graph_shell):
    graph_shell.run_cell('%attribution_graph model "Mary gave a drink to" --transcoders demo '
                         '--max-feature-nodes 20 --examples ["Mary gave a drink to John"] '
                         '--groups {"none": []}')
    g = graph_shell.user_ns["_graph"]
    (bundle,) = graph_shell.user_ns["__shown"]
    assert len(g.nodes.features) == 20
    assert re.search(r"\d  \.\.\.[^<]*\[", bundle["image/svg+xml"])  # top-token hovers
    assert ">none<" not in bundle["image/svg+xml"]                            # empty group


@pytest.mark.parametrize("line,message", [
    ("%attribution_graph", "needs a MODEL and a PROMPT"),
    ("%attribution_graph model --transcoders demo", "needs a PROMPT after MODEL"),
    (f'%attribution_graph model "{IOI}"', "needs --transcoders T"),
    (f'%attribution_graph model "{IOI}" --transcoders demo --traget 1', "did you mean --target"),
    (f'%attribution_graph model "{IOI}" --transcoders demo --out 3x', "not a valid Python name"),
    (f'%attribution_graph model "{IOI}" --transcoders nope', "--transcoders `nope` failed"),
    ('%attribution_graph mdl "x" --transcoders demo', "MODEL `mdl` failed"),
])
def test_bad_lines_are_usage_errors(graph_shell, line, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(")):
        graph_shell.run_cell(line)


def test_engine_errors_keep_their_message(graph_shell):
    graph_shell.user_ns["_graph"] = before = object()
    with pytest.raises(ii.InterventionError, match="no transcoder folder"):
        graph_shell.run_cell(f'%attribution_graph model "{IOI}" --transcoders "/nowhere"')
    assert graph_shell.user_ns["_graph"] is before


def test_the_manual_and_the_parsed_line():
    from ipy_intervene.magics.graph_magic import GraphMagics

    doc = GraphMagics.attribution_graph.__doc__
    assert doc.startswith("%attribution_graph MODEL PROMPT --transcoders T")
    assert "--max-feature-nodes N" in doc and "In [1]:" in doc
    command = GraphCommand.parse('model ["a", "b"][0] --transcoders demo --quiet')
    assert (command.model, command.prompt) == ("model", '["a", "b"][0]')
    assert command.options == {"transcoders": "demo", "quiet": ""}
