"""Every decoder family x every method (issue 29), eager and SDPA: each cell equals a
plain-hooks oracle run one prompt at a time on a left-padded batch of 3 prompts of different
lengths (fp32, 1e-5), or is refused with a clear ``ii`` error naming the family; families
this transformers lacks are skipped by name. The README's family table is generated from the
same cells (tools/family_table.py) and checked here, so it cannot drift.

How the cells are computed and why the table does not depend on test order or ``-k``:
tests/family_matrix.py (the oracles: tests/family_oracles.py, tests/family_eap.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest

import ipy_intervene as ii
from ipy_intervene.errors import ValueMismatchError

import family_matrix as fm
import family_oracles as o
from conftest import hook_count

CELLS = [(family, impl, method) for family in fm.FAMILIES for impl in fm.IMPLS
         for method in fm.METHODS]
README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.mark.parametrize("family, impl, method", CELLS,
                         ids=[f"{f}-{i}-{m}".replace(" ", "_") for f, i, m in CELLS])
def test_each_cell_is_exact_or_a_clear_refusal(family, impl, method):
    out = fm.outcome(family, impl, method)
    if out.status == "skipped":
        pytest.skip(f"{family} ({impl}): {out.reason}")
    assert out.ok, f"{family}, {impl} attention, {method}: {out.status}\n{out.reason}"


def test_the_readme_family_table_is_the_matrix():
    """Asks for every cell (those already computed are reused): the same table whatever ran
    before. ``python tools/family_table.py`` rewrites the section."""
    text = README.read_text()
    assert fm.START in text and fm.END in text, "the README lost its family-table markers"
    section = text[text.index(fm.START):text.index(fm.END) + len(fm.END)]
    assert section == fm.table(), "the README's family table is stale: run " \
                                  "`python tools/family_table.py`"


def test_the_table_marks_each_cell_from_its_outcome():
    marks = {}
    mark = lambda **impls: fm._mark({k: fm.Outcome(*v) for k, v in impls.items()},  # noqa
                                    "gpt2", marks)
    assert mark(eager=("exact",), sdpa=("exact",)) == "✓"
    assert mark(eager=("exact",), sdpa=("skipped", "no sdpa attention")) == "✓"
    assert mark(eager=("refused", "SiteError: no q in gpt2 (max 3.5); use head_out"),
                sdpa=("refused", "SiteError: no q in gpt2 (max 2.5); use head_out")) == "✗1"
    assert mark(eager=("exact",), sdpa=("refused", "InputError: other")) == "✓ eager, ✗2 sdpa"
    assert mark(eager=("skipped", "this transformers has no 'x'"),
                sdpa=("skipped", "this transformers has no 'x'")) == "–"
    assert marks == {"no q in ⟨family⟩": 1, "other": 2}


@pytest.mark.parametrize("family", ["gpt_neo", "falcon"])
def test_an_item_write_into_a_block_that_returns_a_tuple_says_output_0(family):
    """GPT-Neo's and Falcon's blocks return a tuple: ``.output[:, -1] = 0`` is a clear error
    that names the write to make (it was a raw TypeError); that write is exact."""
    model = fm.model_of(family)
    if isinstance(model, str):
        pytest.skip(model)
    model.module.set_attn_implementation("eager")
    before, ns = hook_count(model.module), {}
    with pytest.raises(ValueMismatchError, match=r"`transformer.h\[0\].output` is a tuple of "
                                                 r"\d items: this module returns a tuple.*"
                                                 r"`transformer.h\[0\].output\[0\]\[:, -1\] = "
                                                 r"\.\.\.`"):
        ii.trace(model, "x = 1\nmodel.transformer.h[0].output[:, -1] = 0", o.ids(o.CLEAN),
                 namespace=ns)
    assert "x" not in ns and hook_count(model.module) == before
    fm.cell_trace(model)                     # .output[0][:, -1] = 0: equal to plain hooks
