"""A sweep repeated on unchanged prompts and weights: the second takes the recorded clean and
corrupted runs of the first (``sweep/clean_runs.py``) instead of running them again. Measured
in one process after a warm-up on other prompts, each shape three times (median): the first
sweep (nothing kept), the second (recordings reused), and the second with reuse off (the same
work as the first: the baseline that shows how much is the reuse, not a warm cache). Then the
identical sweep through ``memo.memoized(ii.patch_sweep)`` (``sweep/memo.py``: the whole result
of an identical sweep), first and second call.

    python benchmarks/repeat_sweep.py
"""

from __future__ import annotations

import statistics
import time

import torch

import ipy_intervene as ii
from ipy_intervene.sweep import clean_runs, memo

CLEAN = "When Mary and John went to the store , John gave a drink to"
CORRUPT = "When Mary and John went to the store , Mary gave a drink to"
METRIC = ii.logit_diff("Mary", "John")

SHAPES = {   # what a follow-up cell asks after a first look
    "resid_pre, every layer x position, 1 pair": dict(n=1),
    "resid_pre, every layer x position, 64 pairs": dict(n=64),
    "follow-up: mlp_out at the last position, 64 pairs": dict(n=64, site="mlp_out",
                                                                positions=[-1]),
    "follow-up: head_out of layers 2-3, 64 pairs": dict(n=64, site="head_out", layers=[2, 3]),
}


def sweep(model: ii.Model, n: int, **kw) -> tuple[float, ii.SweepResult]:
    start = time.perf_counter()
    result = ii.patch_sweep(model, [CLEAN] * n, [CORRUPT] * n, METRIC, **kw)
    return time.perf_counter() - start, result


def measure(model: ii.Model, n: int, **kw) -> tuple[float, float, float]:
    first, second, again = [], [], []
    for _ in range(3):
        clean_runs.forget()
        t1, a = sweep(model, n, **kw)
        t2, b = sweep(model, n, **kw)
        assert clean_runs.stats()["hits"] == 2, clean_runs.stats()
        assert torch.equal(a.raw, b.raw), "the reused recordings changed the result"
        clean_runs.forget()
        saved, clean_runs.MAX_ENTRIES = clean_runs.MAX_ENTRIES, 0   # reuse off
        try:
            t3, c = sweep(model, n, **kw)
        finally:
            clean_runs.MAX_ENTRIES = saved
        assert torch.equal(a.raw, c.raw)
        first.append(t1), second.append(t2), again.append(t3)
    return statistics.median(first), statistics.median(second), statistics.median(again)


def measure_memo(model: ii.Model, n: int, **kw) -> tuple[float, float]:
    fast = memo.memoized(ii.patch_sweep)
    first, second = [], []
    for _ in range(3):
        memo.forget(), clean_runs.forget()
        start = time.perf_counter()
        a = fast(model, [CLEAN] * n, [CORRUPT] * n, METRIC, **kw)
        first.append(time.perf_counter() - start)
        start = time.perf_counter()
        b = fast(model, [CLEAN] * n, [CORRUPT] * n, METRIC, **kw)
        second.append(time.perf_counter() - start)
        assert b.extra.get("reused") and torch.equal(a.raw, b.raw)
    memo.forget()
    return statistics.median(first), statistics.median(second)


def main() -> None:
    model = ii.load_model("demo")
    for kw in SHAPES.values():      # warm-up: other prompts, every code path once
        n = kw.get("n")
        ii.patch_sweep(model, [CLEAN.replace("store", "park")] * n,
                       [CORRUPT.replace("store", "park")] * n, METRIC,
                       **{k: v for k, v in kw.items() if k != "n"})
    print(f"demo model, CPU, {torch.get_num_threads()} threads; median of 3")
    print(f"{'shape':<52} {'first':>8} {'second':>8} {'no reuse':>9}  first/second")
    memo_rows = []
    for name, kw in SHAPES.items():
        n = kw.pop("n")
        first, second, again = measure(model, n, **kw)
        print(f"{name:<52} {first * 1e3:7.1f}ms {second * 1e3:7.1f}ms {again * 1e3:8.1f}ms"
              f"  {first / second:5.2f}x  (no reuse / second {again / second:.2f}x)")
        memo_rows.append((name, *measure_memo(model, n, **kw)))
    print("the same sweep again through memo.memoized(ii.patch_sweep):")
    for name, first, second in memo_rows:
        print(f"{name:<52} {first * 1e3:7.1f}ms {second * 1e3:7.2f}ms  {first / second:7.0f}x")
    clean_runs.forget()


if __name__ == "__main__":
    main()
