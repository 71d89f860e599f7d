"""The cell compiler: structure, the intervention graph, and its errors (no model runs)."""

from __future__ import annotations

import builtins

import pytest

from ipy_intervene.compiler.compile import compile_cell, format_path
from ipy_intervene.errors import CellSyntaxError
from ipy_intervene.widgets.graph_view import GraphView, render_svg

CELL = """\
h = model.transformer.h[2].output
if h[0, -1].norm() > 10:
    model.transformer.h[3].mlp.output[:, -1] = 0
acts = [model.transformer.h[l].output for l in range(4)]
model.transformer.h[1].output = h
model.transformer.h[0].skip(h)
logits = model.lm_head(h)
"""


def test_sites_carry_line_path_and_access():
    graph = compile_cell(CELL, has_input=True).graph
    got = [(s.line, s.label, s.access, s.symbolic) for s in graph.sites]
    assert got == [
        (1, "transformer.h[2].output", "read", False),
        (3, "transformer.h[3].mlp.output", "edit", False),
        (4, "transformer.h[l].output", "read", True),
        (5, "transformer.h[1].output", "write", False),
        (6, "transformer.h[0](skip)", "skip", False),
        (7, "lm_head(…)", "call", False),
    ]
    assert graph.published == ["h", "acts", "logits"]


def test_regions_and_invokes():
    source = ("x = 1\nwith tracer.invoke(a):\n    for s in tracer.steps():\n"
              "        while x < 3:\n            x += 1\nwith tracer.invoke(b):\n    y = 2\nz = 3\n")
    cell = compile_cell(source, has_input=False)
    kinds = [(r.kind, r.line) for r in cell.graph.regions]
    assert kinds == [("cell", 1), ("before", 1), ("invoke", 2), ("steps", 3), ("while", 4),
                     ("invoke", 6), ("after", 8)]
    assert len(cell.invokes) == 2 and cell.before is not None and cell.after is not None


def test_names_flowing_between_invokes_become_edges():
    source = ("with tracer.invoke(a):\n    clean = model.transformer.h[1].output\n"
              "with tracer.invoke(b):\n    model.transformer.h[1].output = clean\n")
    graph = compile_cell(source, has_input=False).graph
    stmts = {s.id: s.line for s in graph.statements}
    assert [(stmts[a], stmts[b], name) for a, b, name in graph.edges] == [(2, 4, "clean")]


def test_model_expression_can_be_any_expression():
    graph = compile_cell("h = mt.model.layers[0].output", model_expr="mt.model",
                         has_input=True).graph
    assert [s.path for s in graph.sites] == ["layers[0]"]


def test_attribute_named_output_on_other_objects_is_left_alone():
    graph = compile_cell("r = result.output\nt = model.transformer.h[0].output.clone()",
                         has_input=True).graph
    assert [s.label for s in graph.sites] == ["transformer.h[0].output"]


@pytest.mark.parametrize("source, has_input, line, words", [
    ("x = (\n", True, 1, "never closed"),
    ("h = model.transformer.h[0].output\n", False, None, "no INPUT"),
    ("with tracer.invoke(a):\n    x = 1\ny = x\nwith tracer.invoke(b):\n    pass\n", False, 3,
     "before the forward runs"),
    ("for p in ps:\n    with tracer.invoke(p):\n        x = 1\nwith tracer.invoke(b):\n"
     "    y = x\n", False, 5, "every invoke of the loop at line 1"),
    ("with tracer.invoke(a):\n    x = 1\nwith tracer.invoke(b):\n    x = 2\n"
     "with tracer.invoke(c):\n    y = x\n", False, 6, "the invoke at line 1 and the invoke at line 3"),
    ("with tracer.invoke(a):\n    with tracer.invoke(b):\n        pass\n", False, 2,
     "cannot be inside another invoke"),
    ("with tracer.invoke(a, b):\n    pass\n", False, 1, "one INPUT"),
    ("a = model.transformer.h[0].output = 1\n", True, 1, "one module site at a time"),
    ("del model.transformer.h[0].output\n", True, 1, "cannot be deleted"),
    ("model.transformer.h[0].skip()\n", True, 1, "module.skip(value)"),
    ("model.transformer.h[0].output @= 2\n", True, None, None),
])
def test_invalid_cells_name_the_line(source, has_input, line, words):
    if words is None:  # @= is supported: it compiles
        compile_cell(source, has_input=has_input)
        return
    with pytest.raises(CellSyntaxError) as info:
        compile_cell(source, has_input=has_input)
    assert info.value.line == line and words in str(info.value)


def test_compiled_cells_are_cached_by_source():
    assert compile_cell(CELL, has_input=True) is compile_cell(CELL, has_input=True)
    assert compile_cell(CELL, has_input=True).fresh_graph() is not compile_cell(CELL, has_input=True).graph


def test_format_path():
    assert format_path((("attr", "h"), ("index", 2), ("key", "q"), ("sym", "l + 1"))) == \
        "h[2]['q'][l + 1]"


def test_dot_is_deterministic_and_escaped():
    graph = compile_cell('x = "a \\"quoted\\" word"\nh = model.transformer.h[0].output',
                         has_input=True).graph
    dot = graph.to_dot()
    assert dot == compile_cell('x = "a \\"quoted\\" word"\nh = model.transformer.h[0].output',
                               has_input=True).graph.to_dot()
    assert dot.startswith("digraph") and "quoted" in dot
    assert render_svg(dot).startswith("<svg")  # Graphviz parses the escaped labels


def test_graph_view_renders_svg_and_falls_back_to_dot(monkeypatch):
    graph = compile_cell(CELL, has_input=True).graph
    bundle = GraphView(graph)._repr_mimebundle_()
    assert bundle["image/svg+xml"].startswith("<svg")
    real_import = builtins.__import__

    def no_pygraphviz(name, *args, **kwargs):
        if name == "pygraphviz":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    render_svg.cache_clear()
    monkeypatch.setattr(builtins, "__import__", no_pygraphviz)
    bundle = GraphView(graph)._repr_mimebundle_()
    render_svg.cache_clear()
    assert "image/svg+xml" not in bundle and "digraph" in bundle["text/html"]
    assert "transformer.h[2].output" in bundle["text/plain"]


def test_a_comprehension_between_invokes_may_reuse_an_invoke_s_name():
    cell = compile_cell("with tracer.invoke(a):\n    p = 1\nxs = [p * 2 for p in ps]\n"
                        "with tracer.invoke(xs[0]):\n    pass\n", has_input=False)
    assert len(cell.invokes) == 2
