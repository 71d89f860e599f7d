"""resid_pre activation patching at three model shapes: ours / floor and ours / naive, all in
one run.

    python benchmarks/scale.py [--device cpu] [--repeats 1] [--naive-cells 6] [--only 12x768x8x15]

Cases: (layers, width, prompts, tokens) = (12, 768, 8, 15), (12, 768, 8, 40), (24, 1024, 4, 15)
(GPT-2 shapes, vocab 50257, random weights) x corruption at one position (IOI-shaped: the
middle token differs) or at every position x the built-in ``ii.logit_diff(a, b)`` or the
plain callable ``lambda logits: logits[:, -1, a] - logits[:, -1, b]``.

- ours: ``ii.patch_sweep(model, clean, corrupt, metric)`` (median of ``--repeats``)
- floor: one plain forward with logits at the last position only, times
  sum over (l, p) of (L - l)(P - p) / (L * P): the work a sweep of every cell cannot avoid
  (see benchmarks/sweep.py). Cells whose patch writes exactly the value already there (the
  positions before a one-position corruption) need no forward at all, so ours can be below it.
- naive: one hooked forward per cell with full logits and a sync after each, as
  TransformerLens's ``get_act_patch_resid_pre``; every cell costs one full forward, so it is
  timed on ``--naive-cells`` cells spread over the grid and scaled to the grid's L * P cells
  (the sampled cells are also checked against ours).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Callable

import torch

import ipy_intervene as ii
from shapes import gpt2_ioi
from sweep import block_inputs, floor_factor, sync, timed

SHAPES = ((12, 768, 8, 15), (12, 768, 8, 40), (24, 1024, 4, 15))


@torch.no_grad()
def naive_cells(model: ii.Model, clean: torch.Tensor, corrupt: torch.Tensor,
                metric: Callable, cells: list[tuple[int, int]],
                device: torch.device) -> tuple[float, list[float]]:
    """Seconds per hooked forward (median) and the metric of each cell (mean over prompts)."""
    blocks = model.module.transformer.h
    seen = block_inputs(model, clean)
    times, values = [], []
    for layer, pos in cells:
        def patch(m, args, pos=pos, layer=layer):
            x = args[0].clone()
            x[:, pos] = seen[layer][:, pos]
            return (x, *args[1:])
        handle = blocks[layer].register_forward_pre_hook(patch)
        sync(device)
        start = time.perf_counter()
        try:
            logits = model.module(corrupt).logits
        finally:
            handle.remove()
        values.append(metric(logits).mean().item())  # .item() syncs, as TL's loop does
        times.append(time.perf_counter() - start)
    return statistics.median(times), values


def spread(n_layers: int, length: int, k: int) -> list[tuple[int, int]]:
    """``k`` cells spread over the grid (first, last and between, both axes)."""
    step = max(1, (n_layers * length) // k)
    flat = sorted({*range(0, n_layers * length, step), n_layers * length - 1})[:k]
    return [(i // length, i % length) for i in flat]


def run_shape(shape: tuple[int, int, int, int], args: argparse.Namespace) -> list[str]:
    layers, width, prompts, tokens = shape
    setup = gpt2_ioi(argparse.Namespace(device=args.device, layers=layers, width=width,
                                        prompts=prompts, tokens=tokens))
    model, clean, device = setup.model, setup.clean, setup.device
    everywhere = clean.clone()
    while bool((everywhere == clean).any()):
        same = everywhere == clean
        everywhere[same] = torch.randint(0, 50257, (int(same.sum()),), device=device)
    a, b = 464, 1757
    metrics = {"built-in": ii.logit_diff(a, b),
               "plain": lambda logits: logits[:, -1, a] - logits[:, -1, b]}
    with torch.no_grad():
        model.module(clean)
        plain_last, _ = timed(lambda: model.module(clean, logits_to_keep=1), device, 10)
    floor = plain_last * floor_factor(layers, tokens)
    cells = spread(layers, tokens, args.naive_cells)
    lines = []
    for corruption, corrupt in (("one position", setup.corrupt), ("every position",
                                                                   everywhere)):
        per_forward, expected = naive_cells(model, clean, corrupt, metrics["plain"], cells,
                                            device)
        naive = per_forward * layers * tokens
        for name, metric in metrics.items():
            ours, result = timed(lambda: ii.patch_sweep(model, clean, corrupt, metric), device,
                                 args.repeats)
            got = [float(result.raw[l, p]) for l, p in cells]
            error = max(abs(g - e) for g, e in zip(got, expected))
            assert error < 1e-3, f"ours and the naive loop disagree by {error}"
            lines.append(f"{layers:>3} x {width:<5} {prompts} x {tokens:<3} {corruption:<15} "
                         f"{name:<9} {ours:8.2f} s  {ours / floor:6.2f}  {naive / ours:7.2f}x"
                         f"   floor {floor:6.2f} s, naive {naive:7.1f} s  "
                         f"(|ours - naive| {error:.1e})")
            print(lines[-1], flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--naive-cells", type=int, default=6)
    parser.add_argument("--only", default=None, help="one shape, e.g. 12x768x8x15")
    args = parser.parse_args()
    shapes = [s for s in SHAPES if args.only in (None, "x".join(map(str, s)))]
    start, load = time.perf_counter(), os.getloadavg()
    print(f"{args.device}, {torch.get_num_threads()} threads, load average "
          f"{load[0]:.1f} at the start; resid_pre, denoising")
    print("layers width  batch   corruption      metric       ours   /floor  vs naive")
    for shape in shapes:
        run_shape(shape, args)
    print(f"total {time.perf_counter() - start:.0f} s; load average {os.getloadavg()[0]:.1f} "
          "at the end", file=sys.stderr)


if __name__ == "__main__":
    main()
