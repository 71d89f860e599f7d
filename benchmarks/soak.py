"""A long notebook session: 1,000 consecutive %%trace cells and 50 sweeps in one shell.

    python benchmarks/soak.py [--cells 1000] [--sweeps 50]

After a warm-up of 20 cells and one sweep (so `_sweep`, which keeps the latest result, already
exists), prints the process's resident memory (RSS) and the number of live tensors every 100
cells, and the median time of the last 100 cells over the first 100 (target: within 10%;
single cells take a few ms here, so expect a few % of noise between runs). Growth bounds
(checked by the exit code): RSS grows by less than 64 MiB after the first 100 cells, live
tensors by fewer than 50. `tests/test_reliability.py` runs a short version as a test.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import time

import torch
from IPython.core.interactiveshell import InteractiveShell
from traitlets.config import Config

import ipy_intervene as ii

PROMPT = "When Mary and John went to the store , John gave a drink to"
CORRUPT = "When Mary and John went to the store , Mary gave a drink to"
CELL = (f'%%trace model "{PROMPT}"\n'
        "h = model.transformer.h[2].output\n"
        "if h[0, -1].norm() > 1:\n"
        "    model.transformer.h[3].mlp.output[:, -1] *= 0.5\n"
        "acts = [model.transformer.h[l].output for l in range(4)]\n"
        "logits = model.lm_head.output\n")
SWEEP = ('%patch_sweep model --clean clean --corrupted corrupt '
         '--metric logit_diff("Mary", "John") --quiet')


def rss_mib() -> float:
    with open(f"/proc/{os.getpid()}/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def live_tensors() -> int:
    gc.collect()
    return sum(1 for obj in gc.get_objects() if issubclass(type(obj), torch.Tensor))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=1000)
    parser.add_argument("--sweeps", type=int, default=50)
    args = parser.parse_args()
    config = Config()
    config.HistoryManager.hist_file = ":memory:"  # no sqlite writes to disk between cells
    shell = InteractiveShell.instance(config=config)
    shell.run_line_magic("load_ext", "ipy_intervene")
    shell.user_ns.update(model=ii.load_model("demo"), clean=PROMPT, corrupt=CORRUPT)
    sweep_every = max(1, args.cells // max(args.sweeps, 1))
    for _ in range(20):  # warm-up (not counted): compile paths, caches, `_sweep` exists
        shell.run_cell(CELL).raise_error()
    shell.run_cell(SWEEP).raise_error()
    times, marks = [], []
    for i in range(args.cells):
        start = time.perf_counter()
        result = shell.run_cell(CELL)
        times.append(time.perf_counter() - start)
        result.raise_error()
        if i % sweep_every == sweep_every - 1:
            shell.run_cell(SWEEP).raise_error()
        if i % 100 == 99:
            marks.append((i + 1, rss_mib(), live_tensors()))
            print(f"after {i + 1:5d} cells: RSS {marks[-1][1]:7.1f} MiB, "
                  f"live tensors {marks[-1][2]}")
    first, last = statistics.median(times[:100]), statistics.median(times[-100:])
    rss_growth = marks[-1][1] - marks[0][1]
    tensor_growth = marks[-1][2] - marks[0][2]
    print(f"{args.cells} cells, {args.cells // sweep_every} sweeps")
    print(f"median cell time: first 100 {first * 1e3:.2f} ms, last 100 {last * 1e3:.2f} ms, "
          f"ratio {last / first:.3f} (target within 10%)")
    print(f"growth after the first 100 cells: RSS {rss_growth:+.1f} MiB (bound 64), "
          f"live tensors {tensor_growth:+d} (bound 50)")
    if rss_growth >= 64 or tensor_growth >= 50:
        raise SystemExit("leak: growth beyond the stated bound")


if __name__ == "__main__":
    main()
