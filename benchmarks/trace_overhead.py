"""How much a %%trace cell costs on top of the forward it runs.

    python benchmarks/trace_overhead.py [--repeats 30] [--device cuda]

On a GPT-2-small-shaped model (12 layers, 768 wide, vocab 50257; random weights) with a
batch of 8 x 15 tokens, prints:

- a trace reading one site / a plain forward        (target <= 1.02)
- a trace reading 12 sites / a plain forward        (target <= 1.05)
- the compile time of a 50-line cell                (target < 5 ms)

Times are medians over interleaved repeats, measured in the same process.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

import ipy_intervene as ii
from ipy_intervene.compiler.compile import _compile

ONE_SITE = "h = model.transformer.h[6].output"
TWELVE_SITES = "acts = [model.transformer.h[l].output for l in range(12)]"


def fifty_line_cell() -> str:
    lines = []
    for i in range(10):
        lines += [f"h{i} = model.transformer.h[{i}].output",
                  f"if h{i}[0, -1].norm() > {i}:",
                  f"    model.transformer.h[{i}].mlp.output[:, -1] = 0",
                  f"n{i} = float(h{i}.norm())",
                  f"vals{i} = [x * 2 for x in range(3)]"]
    return "\n".join(lines)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    config = GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257)
    model = ii.wrap(GPT2LMHeadModel(config).eval().to(device))
    ids = torch.randint(0, 50257, (8, 15))
    batch = model.prepare([ids])
    ns = {"model": model}

    def plain():
        with torch.no_grad():
            model.module(**batch.kwargs)

    runs = {"plain": plain,
            "one site": lambda: ii.trace(model, ONE_SITE, ids, namespace=ns),
            "12 sites": lambda: ii.trace(model, TWELVE_SITES, ids, namespace=ns)}
    for fn in runs.values():  # warm up (and fill the compile cache, as a re-run cell does)
        fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    order = list(runs)
    for i in range(args.repeats):  # rotate the order so no run always goes first
        for name in order[i % 3:] + order[: i % 3]:
            times[name].append(timed(runs[name], device))
    med = {name: statistics.median(ts) for name, ts in times.items()}

    source = fifty_line_cell()
    compile_ms = statistics.median(
        timed(lambda: _compile(source, "model", True, "<bench>", None), torch.device("cpu"))
        for _ in range(50)) * 1000

    print(f"device {device}, batch 8 x 15, GPT-2-small shape, {args.repeats} interleaved repeats")
    print(f"plain forward              {med['plain'] * 1000:8.2f} ms")
    print(f"trace, 1 site              {med['one site'] * 1000:8.2f} ms   "
          f"ratio {med['one site'] / med['plain']:.3f}  (target <= 1.02)")
    print(f"trace, 12 sites            {med['12 sites'] * 1000:8.2f} ms   "
          f"ratio {med['12 sites'] / med['plain']:.3f}  (target <= 1.05)")
    print(f"compile, 50-line cell      {compile_ms:8.2f} ms            (target < 5 ms)")


if __name__ == "__main__":
    main()
