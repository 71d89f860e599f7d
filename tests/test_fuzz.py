"""Fuzzing with hypothesis: generated %%trace cells (reads, writes, slices, control flow over
random module paths, some invalid) and generated magic lines. Every case either matches a
plain-hooks oracle or raises our error type: never an internal error, a hang or a crash."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from IPython.core.error import UsageError

import ipy_intervene as ii
from ipy_intervene.errors import InterventionError
from conftest import CORRUPT, PROMPT, hook_count

PARTS = ("ln_1", "mlp", "")          # forward order inside a block
ACTIONS = ("read", "zero", "scale", "add")
SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])
COUNTS = {"cells": 0, "valid": 0, "invalid": 0, "lines": 0}


def path(layer: int, part: str) -> str:
    return f"model.transformer.h[{layer}]" + (f".{part}" if part else "") + ".output"


def module(model, layer: int, part: str):
    block = model.module.transformer.h[layer]
    return getattr(block, part) if part else block


@st.composite
def programs(draw):
    """(ops, wrappers, mutation): ops in forward order, each maybe under if/for."""
    keys = draw(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 2)), min_size=1,
                         max_size=5, unique=True))
    ops = []
    for layer, part in sorted(keys):
        action = draw(st.sampled_from(ACTIONS))
        ops.append({"layer": layer, "part": PARTS[part], "action": action,
                    "pos": draw(st.integers(-15, 14)),
                    "value": draw(st.sampled_from([0.5, 2.0, -1.0, 3.0])),
                    "wrap": draw(st.sampled_from(["", "if", "for0", "for1", "cond"]))})
    mutation = draw(st.sampled_from([None] * 5 + ["layer", "name", "order"]))
    return ops, mutation


def statement(i: int, op: dict, ops: list[dict]) -> list[str]:
    site = path(op["layer"], op["part"])
    body = {"read": f"r{i} = {site}", "zero": f"{site}[:, {op['pos']}] = 0",
            "scale": f"{site} *= {op['value']}",
            "add": f"{site}[:, {op['pos']}] += {op['value']}"}[op["action"]]
    reads = [j for j in range(i) if ops[j]["action"] == "read"]
    wrap = op["wrap"]
    if op["action"] == "read" and wrap in ("for0", "cond"):
        wrap = "for1"  # reads always run, so later conditions can use them
    if wrap == "cond" and not reads:
        wrap = "if"
    head = {"": None, "if": "if True:", "for0": "for _ in range(0):",
            "for1": "for _ in range(1):",
            "cond": f"if float(r{reads[-1] if reads else 0}.mean()) > 0:"}[wrap]
    op["effective_wrap"] = wrap
    op["cond_read"] = reads[-1] if reads else None
    return [body] if head is None else [head, "    " + body]


def source(ops: list[dict]) -> str:
    lines = []
    for i, op in enumerate(ops):
        lines += statement(i, op, ops)
    lines.append("logits = model.lm_head.output")
    return "\n".join(lines)


def oracle(model, ops: list[dict]) -> dict:
    """The same program with plain forward hooks."""
    seen, handles = {}, []
    for i, op in enumerate(ops):
        def hook(m, args, out, i=i, op=op):
            runs = {"": True, "if": True, "for0": False, "for1": True,
                    "cond": op["cond_read"] is not None
                    and float(seen[f"r{op['cond_read']}"].mean()) > 0}[op["effective_wrap"]]
            if not runs:
                return None
            if op["action"] == "read":
                seen[f"r{i}"] = out
                return None
            x = out.clone()
            if op["action"] == "zero":
                x[:, op["pos"]] = 0
            elif op["action"] == "scale":
                x = x * op["value"]
            else:
                x[:, op["pos"]] += op["value"]
            return x
        handles.append(module(model, op["layer"], op["part"]).register_forward_hook(hook))
    try:
        with torch.no_grad():
            seen["logits"] = model.module(model.to_tokens(PROMPT)).logits
    finally:
        for h in handles:
            h.remove()
    return seen


def mutate(text: str, ops: list[dict], mutation: str | None) -> tuple[str, bool]:
    """(source, still valid?): break the program in one of three ways."""
    first = path(ops[0]["layer"], ops[0]["part"])
    if mutation == "layer":
        return text.replace(first, first.replace(f"h[{ops[0]['layer']}]", "h[7]"), 1), False
    if mutation == "name":
        return text.replace("model.transformer.h", "model.transformer.hh", 1), False
    if mutation == "order" and len(ops) > 1 and ops[0]["layer"] < ops[-1]["layer"] \
            and all(op["wrap"] == "" for op in ops):
        last = path(ops[-1]["layer"], ops[-1]["part"])
        return f"early = {last}\n" + text, False
    return text, True


@SETTINGS
@given(program=programs())
def test_generated_cells_match_the_oracle_or_raise_our_error(demo, program):
    ops, mutation = program
    text, valid = mutate(source(ops), ops, mutation)
    ns = {"model": demo}
    COUNTS["cells"] += 1
    if not valid:
        COUNTS["invalid"] += 1
        with pytest.raises(InterventionError):
            ii.trace(demo, text, PROMPT, namespace=ns)
        assert ns == {"model": demo} and hook_count(demo.module) == 0
        return
    COUNTS["valid"] += 1
    ii.trace(demo, text, PROMPT, namespace=ns)
    expected = oracle(demo, ops)
    for name, value in expected.items():
        assert torch.equal(ns[name], value), (name, text)
    assert hook_count(demo.module) == 0


OPTIONS = st.sampled_from([
    "--clean clean", "--corrupted corrupt", '--metric logit_diff("Mary", "John")',
    "--metric prob('Mary')", "--metric lambda l: l[:, -1, 0]", "--metric 3", "--site mlp_out",
    "--site head_out", "--site nonsense", "--method attribution", "--method noise",
    "--subject 'Mary and John'", "--subject 'Paris'", "--layers [0]", "--layers [9]",
    "--positions [-1]", "--positions []", "--heads [1]", "--window 2", "--window 0",
    "--samples 2", "--direction noising", "--batch-size 3", "--out res", "--out 9x",
    "--quiet", "--quiet 1", "--bogus 1", "--layers", "--seed 1", "--noise 1.5", "(", "--",
    "--metric logit_diff(", "--clean ''", "--clean [clean, clean] --corrupted [corrupt, corrupt]",
])


@SETTINGS
@given(parts=st.lists(OPTIONS, max_size=7))
def test_generated_magic_lines_succeed_or_raise_our_errors(shell, parts):
    shell.user_ns.update(clean=PROMPT, corrupt=CORRUPT)
    line = "%patch_sweep model " + " ".join(parts) + " --quiet" * ("--quiet" not in parts)
    COUNTS["lines"] += 1
    try:
        shell.run_cell(line)
    except (UsageError, InterventionError):
        pass
    assert hook_count(shell.user_ns["model"].module) == 0


@SETTINGS
@given(option=st.sampled_from(["", "--generate 2", "--generate 0", "--generate x", "--grad",
                               "--out t", "--out", "--dry-run", "--graph --quiet", "--zzz"]),
       input_=st.sampled_from(["", '"hi there"', "clean", "[clean, corrupt]", "torch.ones(3)",
                               "42", "undefined_name", "{'input_ids': [[1, 2]]}"]))
def test_generated_trace_lines_succeed_or_raise_our_errors(shell, option, input_):
    shell.user_ns.update(clean=PROMPT, corrupt=CORRUPT, torch=torch)
    cell = f"%%trace model {input_} {option}\nlogits = model.lm_head.output\n"
    if not input_:
        cell = cell.replace("logits =", "with tracer.invoke(clean):\n    logits =")
    COUNTS["lines"] += 1
    try:
        shell.run_cell(cell)
    except (UsageError, InterventionError):
        pass
    assert hook_count(shell.user_ns["model"].module) == 0


def test_report_fuzz_counts(capsys):
    """Prints how many cases ran (see `pytest -s tests/test_fuzz.py`)."""
    with capsys.disabled():
        print(f"\nfuzz: {COUNTS['cells']} cells ({COUNTS['valid']} valid, "
              f"{COUNTS['invalid']} invalid), {COUNTS['lines']} magic lines")
    assert COUNTS["cells"] > 0 or COUNTS["lines"] >= 0
