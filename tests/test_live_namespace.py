"""A trace cell runs in the notebook's own namespace, not in a copy of it.

- Functions (and lambdas, methods) a cell defines see the notebook's later globals.
- A helper from a normal cell that writes a global (``global n; n += 1``) keeps its write
  after a successful cell, and the cell itself sees it.
- A failing cell leaves every name it bound, rebound or deleted exactly as it was (same
  objects; deleted names back, new names absent): assignments, loops, imports, ``def``,
  ``class``, walrus targets in comprehensions, ``del``, augmented assignments, unpacking,
  ``except ... as``, and globals its own functions declare and set.
- Memory: cells that define functions, and ``%patch_sweep`` with a lambda metric, keep
  nothing alive beyond what the notebook holds.
- ``ii.patch_sweep`` inside a ``%%trace`` cell gives what it gives outside; a nested
  ``ii.trace`` either gives what it gives outside or says nesting is not supported.

Each test runs both through ``%%trace`` in a TestingShell and through ``ii.trace(...,
namespace=ns)`` where both apply.
"""

from __future__ import annotations

import gc

import psutil
import pytest
import torch

import ipy_intervene as ii
from ipy_intervene.errors import InterventionError
from conftest import CORRUPT, PROMPT, hook_count
from faults import one_torch_thread

HEAD = f'%%trace model "{PROMPT}"\n'


@pytest.fixture(scope="module", autouse=True)
def _steady_timing():
    with one_torch_thread():
        yield


def run_cell(via: str, shell, ns: dict, source: str) -> dict:
    """Run trace-cell ``source`` (with the prompt as input) through the magic (in the
    shell's namespace) or through ``ii.trace`` (in ``ns``); the namespace it ran in."""
    if via == "magic":
        shell.run_cell(HEAD + source)
        return shell.user_ns
    ii.trace(ns["model"], source, PROMPT, namespace=ns)
    return ns


def namespace(via: str, shell, demo, **values) -> dict:
    """The namespace a test works in, with ``model`` and ``values`` bound."""
    if via == "magic":
        shell.user_ns.update(values)
        return shell.user_ns
    return {"model": demo, **values}


VIA = ["magic", "ii.trace"]


# -- 1. functions defined in a cell see later globals -----------------------------------------

DEFINES = """\
h = model.transformer.h[0].output
def f():
    return keep
def g():
    return later
lam = lambda: keep
class C:
    def m(self):
        return keep
logits = model.lm_head.output
def after_forward():
    return later
"""

DEFINES_IN_INVOKES = """\
with tracer.invoke(p):
    h = model.transformer.h[0].output
    def f():
        return keep
    lam = lambda: keep
    logits = model.lm_head.output
with tracer.invoke(p):
    def g():
        return later
    class C:
        def m(self):
            return keep
def after_forward():
    return later
"""


@pytest.mark.parametrize("via", VIA)
@pytest.mark.parametrize("cell", ["line input", "invokes"])
def test_functions_defined_in_a_cell_see_later_globals(shell, demo, via, cell):
    ns = namespace(via, shell, demo, keep=1, p=PROMPT)
    if cell == "line input":
        run_cell(via, shell, ns, DEFINES)
    elif via == "magic":
        shell.run_cell("%%trace model\n" + DEFINES_IN_INVOKES)
    else:
        from ipy_intervene.tracing.trace import NO_INPUT

        ii.trace(demo, DEFINES_IN_INVOKES, NO_INPUT, namespace=ns)
    assert "later" not in ns
    ns["keep"] = 2      # the notebook rebinds a global after the cell ...
    ns["later"] = 3     # ... and binds one the cell never saw
    stale = "sees a copy of the namespace taken when the cell ran"
    assert ns["f"]() == 2, f"a function defined in the cell {stale}"
    assert ns["lam"]() == 2, f"a lambda defined in the cell {stale}"
    assert ns["C"]().m() == 2, f"a method of a class defined in the cell {stale}"
    assert ns["g"]() == 3, f"a function defined in the cell {stale}"
    assert ns["after_forward"]() == 3, f"a function defined after the forward {stale}"


# -- 2. a helper's global writes stay ---------------------------------------------------------

HELPER = """\
n = 0
def bump():
    global n, made
    n += 1
    made = n * 10
    return n
"""


@pytest.mark.parametrize("via", VIA)
def test_a_helpers_global_writes_survive_a_successful_cell(shell, demo, via):
    ns = namespace(via, shell, demo)
    if via == "magic":
        shell.run_cell(HELPER)
    else:
        exec(HELPER, ns)
    run_cell(via, shell, ns, "first = bump()\n"
                             "h = model.transformer.h[1].output\n"
                             "second = bump()\n"
                             "seen = n\n"
                             "logits = model.lm_head.output\n"
                             "for _ in range(2):\n    bump()\n")
    assert (ns["first"], ns["second"]) == (1, 2)
    assert ns["seen"] == 2, "the cell does not see the helper's write to n"
    assert ns["n"] == 4, "n is not the helper's: a stale copy was published over it"
    assert ns.get("made") == 40, "a global the helper created is gone after the cell"


# -- 3. a failing cell leaves every name as it was --------------------------------------------

FAILING = """\
h = model.transformer.h[0].output
keep = "changed"
for i in range(3):
    acc = i
    fresh_loop = i
import json
import os.path as keep_path
def fn():
    return "new"
class K:
    pass
ys = [(w := v) for v in range(3)]
zs = [(w_new := v) for v in range(2)]
del gone
a, (b, *c) = 1, (2, 3, 4)
counter += 1
try:
    raise ValueError("x")
except ValueError as err:
    caught = True
def setter():
    global via_global, keep3
    via_global = 1
    keep3 = "changed"
setter()
{failure_during}logits = model.lm_head.output
{failure_after}"""


def _failing_cell(where: str) -> str:
    return FAILING.format(failure_during="1 / 0\n" if where == "during" else "",
                          failure_after="1 / 0\n" if where == "after" else "")


def _existing() -> dict:
    """Names the notebook has before the failing cell (each a distinct object)."""
    return {"keep": object(), "i": object(), "acc": object(), "keep_path": object(),
            "fn": object(), "w": object(), "gone": object(), "a": object(),
            "counter": 10 ** 20, "keep3": object(), "untouched": object()}


NEW = ("h", "fresh_loop", "json", "K", "ys", "zs", "w_new", "b", "c", "err", "caught",
       "setter", "via_global", "logits")


@pytest.mark.parametrize("where", ["during", "after"])
@pytest.mark.parametrize("via", VIA)
def test_a_failing_cell_leaves_every_name_as_it_was(shell, demo, via, where):
    """``where``: the failure is during the forward (before the last site) or after it."""
    ns = namespace(via, shell, demo, **_existing())
    before = {k: v for k, v in ns.items() if not k.startswith("_")}
    dunders = {k for k in ns if k.startswith("__")}
    with pytest.raises(ZeroDivisionError):
        run_cell(via, shell, ns, _failing_cell(where))
    after = {k: v for k, v in ns.items() if not k.startswith("_")}
    assert sorted(set(after) - set(before)) == [], "new names were left behind"
    assert sorted(set(before) - set(after)) == [], "names were deleted"
    changed = sorted(k for k in before if after[k] is not before[k])
    assert changed == [], f"names rebound: {changed}"
    assert not set(NEW) & set(ns)
    assert {k for k in ns if k.startswith("__")} == dunders
    assert hook_count(demo.module) == 0


def test_the_failing_cell_binds_all_those_names_when_it_succeeds(demo):
    """The same cell without the failure does bind and rebind every name checked above
    (so the test above checks something)."""
    ns = {"model": demo, **_existing()}
    before = dict(ns)
    ii.trace(demo, _failing_cell("nowhere"), PROMPT, namespace=ns)
    assert set(NEW) - {"err"} <= set(ns)   # `except ... as err` unbinds err at its end
    rebound = {k for k in before if k != "untouched" and (k not in ns or ns[k] is not before[k])}
    assert rebound == set(before) - {"untouched", "model"}


# -- 4. memory ---------------------------------------------------------------------------

def _live_tensors() -> int:
    gc.collect()
    return sum(1 for obj in gc.get_objects() if issubclass(type(obj), torch.Tensor))


def _rss() -> int:
    gc.collect()
    return psutil.Process().memory_info().rss


def _forget_output_history(shell) -> None:
    """Drop IPython's output history (``Out[]``, ``_``, ``__``, ``___``, ``_N``), as
    ``%reset out`` does: ``%patch_sweep`` as a cell's last line returns its result there,
    and what that holds is IPython's to keep, not a leak."""
    shell.displayhook.flush()
    for ns in (shell.user_ns, shell.user_ns_hidden):  # IPython keeps hidden copies too
        for name in [k for k in ns if k in ("_", "__", "___") or k[:1] == "_" and k[1:].isdigit()]:
            ns[name] = ""


MEMORY_CELL = HEAD + """\
h = model.transformer.h[2].output
big = torch.ones(262144)                       # 1 MB, rebound by every cell
def f():
    return big.sum() + h.sum() + keep
logits = model.lm_head.output
"""

SWEEP = ("%patch_sweep model --clean clean --corrupted corrupt "
         "--metric lambda logits: logits[:, -1, a] - logits[:, -1, b] "
         "--layers [2, 3] --positions [13, 14] --quiet")


def test_cells_defining_functions_and_lambda_sweeps_keep_nothing_alive(shell, demo):
    """30 cells that each define a function and bind a 1 MB tensor, and 20 sweeps with a
    lambda metric; the notebook rebinds the same names each time, so live tensors grow by
    at most 10 and RSS by at most 8 MB (one cell's worth kept per cell would be 30 MB)."""
    shell.user_ns.update(clean=PROMPT, corrupt=CORRUPT, keep=1, a=demo.token_id("Mary"),
                         b=demo.token_id("John"))
    shell.run_cell("import torch")
    for _ in range(3):  # warm caches
        shell.run_cell(MEMORY_CELL)
        shell.run_cell(SWEEP)
    _forget_output_history(shell)
    tensors, rss = _live_tensors(), _rss()
    for i in range(30):
        shell.run_cell(MEMORY_CELL)
        if i < 20:
            shell.run_cell(SWEEP)
    assert float(shell.user_ns["f"]()) == pytest.approx(
        262144 + float(shell.user_ns["h"].sum()) + 1, rel=1e-5)
    _forget_output_history(shell)
    grown_tensors, grown_mb = _live_tensors() - tensors, (_rss() - rss) / 2 ** 20
    assert grown_tensors <= 10, f"{grown_tensors} more live tensors after 30 cells, 20 sweeps"
    assert grown_mb <= 8, f"RSS grew by {grown_mb:.0f} MB after 30 cells and 20 sweeps"
    assert hook_count(demo.module) == 0


# -- 5. a sweep, and a trace, inside a trace cell -------------------------------------------

INNER_SWEEP = ('inner = ii.patch_sweep(model, clean, corrupt, ii.logit_diff("Mary", "John"), '
               'layers=[1, 2], positions=[11, 14], method=method)\n')
PLACES = {
    "before the first site": INNER_SWEEP + "h = model.transformer.h[1].output\n"
                                           "logits = model.lm_head.output\n",
    "between sites": "h = model.transformer.h[1].output\n" + INNER_SWEEP
                     + "logits = model.lm_head.output\n",
    "after the last site": "h = model.transformer.h[1].output\n"
                           "logits = model.lm_head.output\n" + INNER_SWEEP,
}


@pytest.mark.parametrize("method,place", [("activation", p) for p in PLACES]
                         + [("attribution", "between sites")])
@pytest.mark.parametrize("via", VIA)
def test_a_sweep_inside_a_trace_cell_equals_the_same_sweep_outside(shell, demo, via, method,
                                                                    place):
    ns = namespace(via, shell, demo, ii=ii, clean=PROMPT, corrupt=CORRUPT, method=method)
    grad_mode = torch.is_grad_enabled()
    outside = ii.patch_sweep(demo, PROMPT, CORRUPT, ii.logit_diff("Mary", "John"),
                             layers=[1, 2], positions=[11, 14], method=method)
    plain = ii.trace(demo, "h = model.transformer.h[1].output\nlogits = model.lm_head.output",
                     PROMPT, namespace={"model": demo}).names
    run_cell(via, shell, ns, PLACES[place])
    inner = ns["inner"]
    torch.testing.assert_close(inner.raw, outside.raw, atol=1e-5, rtol=0)
    torch.testing.assert_close(inner.values, outside.values, atol=1e-5, rtol=0)
    assert torch.equal(ns["h"], plain["h"])            # the trace's own values are untouched
    assert torch.equal(ns["logits"], plain["logits"])
    assert hook_count(demo.module) == 0
    assert torch.is_grad_enabled() == grad_mode


NESTED = """\
h = model.transformer.h[1].output
x = ii.trace(model, "x = model.transformer.h[2].output", corrupt).names["x"]
logits = model.lm_head.output
"""


@pytest.mark.parametrize("via", VIA)
def test_a_nested_trace_works_or_says_nesting_is_not_supported(shell, demo, via):
    ns = namespace(via, shell, demo, ii=ii, corrupt=CORRUPT)
    alone = ii.trace(demo, "x = model.transformer.h[2].output", CORRUPT,
                     namespace={"model": demo}).names["x"]
    plain = ii.trace(demo, "h = model.transformer.h[1].output\nlogits = model.lm_head.output",
                     PROMPT, namespace={"model": demo}).names
    try:
        run_cell(via, shell, ns, NESTED)
    except InterventionError as exc:
        assert "nest" in str(exc).lower(), f"an InterventionError, but not about nesting: {exc}"
        assert "h" not in ns and "x" not in ns and "logits" not in ns
    else:
        assert torch.equal(ns["x"], alone)
        assert torch.equal(ns["h"], plain["h"]) and torch.equal(ns["logits"], plain["logits"])
    assert hook_count(demo.module) == 0
    again = ii.trace(demo, "x = model.transformer.h[2].output", CORRUPT,
                     namespace={"model": demo}).names["x"]
    assert torch.equal(again, alone)
