"""A position past the prompt, read or written, in a normal run and in ``--dry-run``: a
SiteError naming the cell line, the position asked and the prompt's (padded) length; nothing
is published, no hook is left, the weights are unchanged."""

from __future__ import annotations

import pytest
import torch

import ipy_intervene as ii
from ipy_intervene.errors import SiteError
from conftest import PROMPT, SHORT, checksum, hook_count, hooks

assert len(SHORT.split()) + 1 == 7  # SHORT is 7 tokens for the demo tokenizer (with BOS)

CELLS = {
    "read": "x = 1\nh = model.transformer.h[1].output[:, 20]\n",
    "read later": "x = 1\nh = model.transformer.h[1].output\ny = h[:, -20]\n",
    "write": "x = 1\nmodel.transformer.h[1].output[:, 20] = 0\n",
    "write negative": "x = 1\nmodel.transformer.h[1].output[0, -8, :] = 0\n",
}
LINE = {"read": 2, "read later": 3, "write": 2, "write negative": 2}
ASKED = {"read": "20", "read later": "-20", "write": "20", "write negative": "-8"}


def fails_cleanly(model, source, input, match, *, dry_run=False):
    ns = {"keep": 1}
    before, weights = hook_count(model.module), checksum(model.module)
    with pytest.raises(SiteError, match=match) as info:
        ii.trace(model, source, input, namespace=ns, dry_run=dry_run)
    assert ns == {"keep": 1, "model": model}
    assert hook_count(model.module) == before and checksum(model.module) == weights
    return info.value


@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry-run"])
@pytest.mark.parametrize("kind", list(CELLS))
def test_a_position_past_the_prompt_names_line_position_and_length(demo, kind, dry_run):
    exc = fails_cleanly(demo, CELLS[kind], SHORT,
                        rf"^line {LINE[kind]}: position {ASKED[kind]} is past the prompt.*"
                        r"the prompt is 7 tokens long.*0\.\.6 \(or -7\.\.-1\)", dry_run=dry_run)
    assert exc.line == LINE[kind]
    assert isinstance(exc, IndexError)  # `except IndexError` keeps working


def test_the_length_named_is_the_padded_length_of_the_batch(demo):
    fails_cleanly(demo, "h = model.transformer.h[0].output[:, 15]", [PROMPT, SHORT],
                  r"^line 1: position 15 .* 15 tokens long")


def test_other_dimensions_are_named_as_dimensions(demo):
    width = demo.config.n_embd
    fails_cleanly(demo, f"model.transformer.h[0].output[:, 0, {width}] = 0", SHORT,
                  rf"^line 1: index {width} is past the end of dimension 2 of "
                  rf"`transformer.h\[0\].output\[:, 0, {width}\]` \(shape \[1, 7, {width}\]\): "
                  rf"it has {width} entries")


@pytest.mark.parametrize("kind", ["read", "write"])
@pytest.mark.parametrize("dry", ["", " --dry-run"])
def test_the_magic_names_the_line(shell, capsys, kind, dry):
    shell.user_ns["p"] = SHORT
    before = hook_count(shell.user_ns["model"].module)
    line = LINE[kind] + 1  # the cell's line numbers count the %%trace line
    with pytest.raises(SiteError, match=rf"line {line}: position 20 is past the prompt.* 7 tokens"):
        shell.run_cell(f"%%trace model p{dry}\n{CELLS[kind]}")
    shown = capsys.readouterr().out
    assert f"line {line}" in shown and CELLS[kind].splitlines()[1] in shown
    assert "x" not in shell.user_ns and "h" not in shell.user_ns
    assert hook_count(shell.user_ns["model"].module) == before


def test_the_last_position_still_reads_and_writes(demo):
    ns = {}
    ii.trace(demo, "h = model.transformer.h[1].output[:, 6].clone()\n"
                   "model.transformer.h[1].output[:, -7] = 0\n"
                   "logits = model.lm_head.output", SHORT, namespace=ns)
    seen = {}

    def edit(m, a, o):
        seen["h"] = o[:, 6].clone()
        o = o.clone()
        o[:, 0] = 0
        return o

    with torch.no_grad(), hooks((demo.module.transformer.h[1], edit)):
        logits = demo.module(demo.to_tokens(SHORT)).logits
    assert torch.equal(ns["h"], seen["h"])
    torch.testing.assert_close(ns["logits"], logits, atol=1e-6, rtol=0)


def test_an_index_error_before_the_batch_is_not_blamed_on_the_last_prompt(demo):
    ii.trace(demo, "h = model.transformer.h[0].output", SHORT, namespace={})  # 7 tokens
    source = ("y = torch.zeros(1, 7)[:, 20]\n"
              "with tracer.invoke(p):\n    h = model.transformer.h[0].output\n")
    with pytest.raises(IndexError) as info:
        ii.trace(demo, source, namespace={"torch": torch, "p": SHORT})
    assert not isinstance(info.value, SiteError)
    assert "out of bounds" in str(info.value)
