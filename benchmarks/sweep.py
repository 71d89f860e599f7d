"""A full resid_pre activation-patching sweep: ours vs the naive loop vs the floor.

    python benchmarks/sweep.py [--repeats 3] [--device cuda] [--layers 12 --width 768]

On a GPT-2-small-shaped model (12 layers, 768 wide, vocab 50257; random weights) with an
IOI-shaped batch (8 prompts x 15 tokens; the corrupted prompts differ at one position),
all in one process:

- naive: one hooked forward per (layer, position), full logits, a sync after each
  (what TransformerLens's ``get_act_patch_resid_pre`` does)
- ours: ``ii.patch_sweep(..., site="resid_pre")``
- floor: one plain forward computing logits at the last position only, times
  sum over (l, p) of (L - l)(P - p) / (L * P): the work a sweep cannot avoid

and prints ours / naive (target: >= 4x faster), ours / floor (target <= 1.5), attribution
patching of the whole grid / one plain forward (target <= 4), and the sweep's peak memory
next to its budget. Times are medians over ``--repeats``; the two sweeps must agree.
"""

from __future__ import annotations

import resource
import statistics
import time
from typing import Callable

import torch
import ipy_intervene as ii
from ipy_intervene.sweep import memory
from shapes import arguments, gpt2_ioi


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


@torch.no_grad()
def block_inputs(model: ii.Model, clean: torch.Tensor) -> dict[int, torch.Tensor]:
    """Each GPT-2 block's input hidden states in the clean run, by a plain pre-hook."""
    seen: dict[int, torch.Tensor] = {}
    handles = [b.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(i, a[0]))
               for i, b in enumerate(model.module.transformer.h)]
    try:
        model.module(clean)
    finally:
        for h in handles:
            h.remove()
    return seen


@torch.no_grad()
def naive_sweep(model: ii.Model, clean: torch.Tensor, corrupt: torch.Tensor,
                metric: Callable, device: torch.device) -> torch.Tensor:
    """One forward per (layer, position) with a plain pre-hook, full logits."""
    blocks = model.module.transformer.h
    seen = block_inputs(model, clean)
    out = torch.empty(len(blocks), clean.shape[1])
    for layer, block in enumerate(blocks):
        for pos in range(clean.shape[1]):
            def patch(m, args, pos=pos, layer=layer):
                x = args[0].clone()
                x[:, pos] = seen[layer][:, pos]
                return (x, *args[1:])
            handle = block.register_forward_pre_hook(patch)
            try:
                logits = model.module(corrupt).logits
            finally:
                handle.remove()
            out[layer, pos] = metric(logits).mean().item()  # .item() syncs, as TL's loop does
    return out


def floor_factor(n_layers: int, length: int) -> float:
    return sum((n_layers - l) * (length - p) for l in range(n_layers)
               for p in range(length)) / (n_layers * length)


def main() -> None:
    parser = arguments(__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    setup = gpt2_ioi(args)
    model, clean, corrupt, metric, device = (setup.model, setup.clean, setup.corrupt,
                                             setup.metric, setup.device)
    naive_metric = metric.bind(model, args.prompts)
    L, P = args.layers, args.tokens

    with torch.no_grad():  # warm up, then medians of 10
        model.module(clean)
        plain_full, _ = timed(lambda: model.module(clean), device, 10)
        plain_last, _ = timed(lambda: model.module(clean, logits_to_keep=1), device, 10)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    ours, result = timed(lambda: ii.patch_sweep(model, clean, corrupt, metric), device,
                         args.repeats)
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda" else
            (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) * 1024)
    attribution, _ = timed(lambda: ii.patch_sweep(model, clean, corrupt, metric,
                                                  method="attribution"), device, args.repeats)
    naive, expected = timed(lambda: naive_sweep(model, clean, corrupt, naive_metric, device),
                            device, max(1, args.repeats // 3))
    error = float((result.raw - expected).abs().max())
    floor = plain_last * floor_factor(L, P)

    print(f"GPT-2 shape {L} layers x {args.width}, batch {args.prompts} x {P} tokens, "
          f"{device}, {torch.get_num_threads()} threads; grid {L} x {P} = {L * P} cells")
    print(f"plain forward: {plain_full * 1e3:.1f} ms (logits at the last position only: "
          f"{plain_last * 1e3:.1f} ms)")
    print(f"naive loop:  {naive:8.2f} s   ({L * P} hooked forwards)")
    print(f"ours:        {ours:8.2f} s   max |ours - naive| = {error:.2e}")
    print(f"floor:       {floor:8.2f} s   ({floor_factor(L, P):.1f} last-position forwards)")
    print(f"speed-up vs naive: {naive / ours:.2f}x   (target >= 4)")
    print(f"ours / floor:      {ours / floor:.2f}    (target <= 1.5)")
    print(f"attribution:       {attribution / plain_full:.2f} plain forwards "
          f"({attribution * 1e3:.0f} ms; target <= 4)")
    budget = memory.budget(device, 0.25)
    print(f"memory: sweep peak {peak / 2**20:.0f} MiB "
          f"({'CUDA allocator' if device.type == 'cuda' else 'growth of max RSS'}); "
          f"budget {budget / 2**20:.0f} MiB (0.25 of free memory)")
    assert error < 1e-3, "the sweeps disagree"


if __name__ == "__main__":
    main()
