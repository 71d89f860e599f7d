"""Real model sizes on a GPU (issue 29): a Gemma-2-2B-shaped and a Llama-3-8B-shaped model with
random weights in bf16. For each: the time and peak GPU memory of a resid_pre sweep, of
``ii.cache`` over 1,000 prompts and of ``ii.edge_attribution``, each next to a naive loop of
plain hooks measured in the same run (a sample of its iterations, scaled to the whole loop).

    python benchmarks/real_sizes.py                        # on cuda, both shapes
    python benchmarks/real_sizes.py --device cpu --tiny    # the same script on small shapes

Prints one line per measurement, ``ratio`` = naive / ipy_intervene (above 1: faster here). A
section that fails prints FAIL and why; the others still run.
"""

from __future__ import annotations

import argparse
import time
import traceback
from typing import Callable

import torch
from transformers import AutoConfig, AutoModelForCausalLM

import ipy_intervene as ii

SHAPES = {
    "gemma2-2b": ("gemma2", dict(hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                                 num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                                 vocab_size=256000)),
    "llama3-8b": ("llama", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=8,
                                vocab_size=128256, rope_theta=500000.0)),
}
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=512)


def build(model_type: str, shape: dict, device: torch.device, dtype: torch.dtype) -> ii.Model:
    """A random model of ``model_type`` built directly on ``device`` in ``dtype``."""
    config = AutoConfig.for_model(model_type, **shape)
    torch.manual_seed(0)
    with torch.device(device):
        module = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return ii.wrap(module.eval())


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """Seconds and peak GPU memory (GiB; 0 on the CPU) of one call."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
    return time.perf_counter() - start, peak


def blocks_of(model: ii.Model) -> torch.nn.ModuleList:
    from ipy_intervene.arch.sites import adapter_for, get_path

    return get_path(model.module, adapter_for(model).blocks)


def record_inputs(model: ii.Model, ids: torch.Tensor) -> list[torch.Tensor]:
    """Every block's input (resid_pre) on one forward of ``ids``, with plain hooks."""
    saved: list[torch.Tensor] = []

    def grab(m, args, kwargs):
        saved.append((args[0] if args else kwargs["hidden_states"]).clone())

    handles = [b.register_forward_pre_hook(grab, with_kwargs=True) for b in blocks_of(model)]
    try:
        with torch.no_grad():
            model.module(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    return saved


def naive_sweep_cell(model: ii.Model, clean_pre: list[torch.Tensor], corrupt: torch.Tensor,
                     layer: int, pos: int) -> None:
    """One cell of the sweep as a user would write it: the corrupted forward with the clean
    resid_pre at (layer, pos), one plain hook (the clean run recorded once, not timed)."""

    def put(m, args, kwargs):
        h = (args[0] if args else kwargs["hidden_states"]).clone()
        h[:, pos] = clean_pre[layer][:, pos]
        return ((h, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": h})

    patch = blocks_of(model)[layer].register_forward_pre_hook(put, with_kwargs=True)
    try:
        with torch.no_grad():
            model.module(input_ids=corrupt)
    finally:
        patch.remove()


def naive_cache_prompt(model: ii.Model, ids: torch.Tensor) -> list[torch.Tensor]:
    kept, handles = [], [b.register_forward_hook(lambda m, a, out: kept.append(
        (out[0] if isinstance(out, tuple) else out)[:, -1].cpu())) for b in blocks_of(model)]
    try:
        with torch.no_grad():
            model.module(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    return kept


def report(name: str, ours: tuple[float, float], naive_s: float, note: str) -> None:
    print(f"{name:<34} {ours[0]:8.2f} s  peak {ours[1]:6.2f} GiB   naive {naive_s:9.2f} s   "
          f"ratio {naive_s / ours[0]:7.1f}x   ({note})", flush=True)


def bench(label: str, model: ii.Model, args: argparse.Namespace, device: torch.device) -> None:
    vocab, layers = model.module.config.vocab_size, len(blocks_of(model))
    g = torch.Generator().manual_seed(1)
    clean = torch.randint(0, vocab, (args.prompts, args.tokens), generator=g).to(device)
    corrupt = clean.clone()
    corrupt[:, args.tokens // 2] = torch.randint(0, vocab, (args.prompts,), generator=g).to(device)
    metric = ii.logit_diff(11, 12)

    def section(name: str, body: Callable[[], None]) -> None:
        try:
            body()
        except Exception as error:          # a failing section says why; the others run
            print(f"FAIL {label} {name}: {type(error).__name__}: {error}", flush=True)
            traceback.print_exc(limit=3)

    def sweep() -> None:
        ours = timed(lambda: ii.patch_sweep(model, clean, corrupt, metric, site="resid_pre"),
                     device)
        sample = [(layer, pos) for layer in (0, layers // 2, layers - 1) for pos in (0, 1)]
        clean_pre = record_inputs(model, clean)
        took = sum(timed(lambda c=c: naive_sweep_cell(model, clean_pre, corrupt, *c),
                         device)[0] for c in sample)
        cells = layers * args.tokens
        report(f"{label} resid sweep {layers}x{args.tokens}", ours, took / len(sample) * cells,
               f"naive: {len(sample)} of {cells} cells timed, scaled")

    def cache() -> None:
        prompts = torch.randint(0, vocab, (args.cache_prompts, args.cache_tokens),
                                generator=g).to(device)
        ours = timed(lambda: ii.cache(model, prompts, sites="resid_post", positions=[-1],
                                      device="cpu"), device)
        sample = 20
        took = timed(lambda: [naive_cache_prompt(model, prompts[i:i + 1])
                              for i in range(sample)], device)[0]
        report(f"{label} cache {args.cache_prompts} prompts", ours,
               took / sample * args.cache_prompts, f"naive: {sample} prompts timed, scaled")

    def eap() -> None:
        result: list = []
        ours = timed(lambda: result.append(ii.edge_attribution(model, clean[:2], corrupt[:2],
                                                                metric)), device)
        count = int(result[0].scores.isfinite().sum())
        # The naive loop patches one edge per forward; its cost is at least one forward per
        # edge, so a forward's time times the edge count is a floor on it.
        with torch.no_grad():
            forward = timed(lambda: model.module(input_ids=corrupt[:2]), device)[0]
        report(f"{label} EAP, 2 prompts", ours, forward * count,
               f"naive floor: one forward per edge, {count} edges")

    for name, body in (("sweep", sweep), ("cache", cache), ("eap", eap)):
        section(name, body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="small shapes (to try the script)")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--cache-prompts", type=int, default=1000)
    parser.add_argument("--cache-tokens", type=int, default=16)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    for label in args.shapes.split(","):
        model_type, shape = SHAPES[label]
        try:
            model = build(model_type, {**shape, **TINY} if args.tiny else shape, device, dtype)
        except Exception as error:
            print(f"FAIL {label} build: {type(error).__name__}: {error}", flush=True)
            continue
        print(f"{label}: {sum(p.numel() for p in model.module.parameters()) / 1e9:.2f} B "
              f"parameters, {dtype}, {device}", flush=True)
        bench(label, model, args, device)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
