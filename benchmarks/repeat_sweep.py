"""The same sweep again: ``ii.patch_sweep`` returns the earlier result once a forward proves
it current (``sweep/memo.py``). Measured in one process after a warm-up on other prompts,
each shape three times (median):

- ``plain``: the sweep with no memo at all (``sweep.api.patch_sweep``), the baseline;
- ``first``: the first ``ii.patch_sweep`` when it is kept (the sweep, then the witness
  forward);
- ``repeat``: the identical sweep again (cheap checks plus the witness forward, compared);
- ``proof``: the witness forward alone.

These demo sweeps take less than ``memo.MIN_SECONDS``, so by default they are not kept (and
pay nothing); the table keeps them (``MIN_SECONDS = 0``) to measure the mechanism. Prints
first/plain (what keeping costs) and plain/repeat (what a repeat saves; the goal is >= 2x).

    python benchmarks/repeat_sweep.py
"""

from __future__ import annotations

import statistics
import time

import torch

import ipy_intervene as ii
from ipy_intervene.sweep import api, memo, proof

CLEAN = "When Mary and John went to the store , John gave a drink to"
CORRUPT = "When Mary and John went to the store , Mary gave a drink to"
METRIC = ii.logit_diff("Mary", "John")

SHAPES = {   # what a follow-up cell asks after a first look
    "resid_pre, every layer x position, 1 pair": dict(n=1),
    "resid_pre, every layer x position, 64 pairs": dict(n=64),
    "mlp_out at the last position, 64 pairs": dict(n=64, site="mlp_out", positions=[-1]),
    "head_out of layers 2-3, 64 pairs": dict(n=64, site="head_out", layers=[2, 3]),
}


def timed(fn, *args, **kw) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn(*args, **kw)
    return time.perf_counter() - start, out


def measure(model: ii.Model, n: int, **kw) -> dict[str, float]:
    times: dict[str, list[float]] = {"plain": [], "first": [], "repeat": [], "proof": []}
    pair = ([CLEAN] * n, [CORRUPT] * n)
    for _ in range(3):
        memo.forget()
        t, plain = timed(api.patch_sweep, model, *pair, METRIC, **kw)
        times["plain"].append(t)
        t, first = timed(ii.patch_sweep, model, *pair, METRIC, **kw)
        times["first"].append(t)
        t, again = timed(ii.patch_sweep, model, *pair, METRIC, **kw)
        times["repeat"].append(t)
        assert again.extra.get("reused") and torch.equal(again.raw, plain.raw)
        assert "reused" not in first.extra and torch.equal(first.raw, plain.raw)
        options = {"clean": pair[0], "corrupted": pair[1]}
        times["proof"].append(timed(proof.Witness.of, model, options, METRIC)[0])
    memo.forget()
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    memo.MIN_SECONDS = 0.0          # keep these quick sweeps too: measure the mechanism
    model = ii.load_model("demo")
    for kw in SHAPES.values():      # warm-up: other prompts, every code path once
        n = kw.get("n")
        ii.patch_sweep(model, [CLEAN.replace("store", "park")] * n,
                       [CORRUPT.replace("store", "park")] * n, METRIC,
                       **{k: v for k, v in kw.items() if k != "n"})
    print(f"demo model, CPU, {torch.get_num_threads()} threads; median of 3")
    print(f"{'shape':<46} {'plain':>8} {'first':>8} {'repeat':>8} {'proof':>8}"
          f"  first/plain  plain/repeat")
    for name, kw in SHAPES.items():
        kw = dict(kw)
        t = measure(model, kw.pop("n"), **kw)
        print(f"{name:<46} " + " ".join(f"{t[k] * 1e3:6.1f}ms" for k in
                                        ("plain", "first", "repeat", "proof"))
              + f"  {t['first'] / t['plain']:10.2f}x  {t['plain'] / t['repeat']:11.2f}x")


if __name__ == "__main__":
    main()
