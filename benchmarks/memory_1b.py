"""A sweep on a Llama-shaped ~1.1B-parameter model (TinyLlama's shape, random weights,
float32) with 64-token prompts: its peak memory next to its budget, and how it chunked.

    python benchmarks/memory_1b.py [--prompts 2] [--fraction 0.25] [--layers 0,11,21]

The weights (4.4 GB) and the two recordings (residual stream and keys/values of every
layer) are there before the sweep starts; the budget (``memory_fraction`` of the free memory
then) bounds one chunk's activations. The sweep covers the given layers at every position,
so every prefix length is planned and run; the cells are checked against plain-hooks
patched runs at three of them.
"""

from __future__ import annotations

import argparse
import resource
import threading
import time
from contextlib import contextmanager

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import psutil

import ipy_intervene as ii
from ipy_intervene.sweep import memory
from ipy_intervene.sweep.staircase import Engine

TINYLLAMA = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                 num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
                 max_position_embeddings=2048)


def rss_peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@contextmanager
def chunk_peak():
    """``{"grew": bytes}``: the resident memory's peak while ``Engine.run`` runs the chunks,
    over what was resident when it started (the weights and recordings were already there);
    sampled every millisecond by a thread."""
    process, seen, out = psutil.Process(), {"base": None, "peak": 0}, {}
    running = threading.Event()
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            if running.is_set():
                seen["peak"] = max(seen["peak"], process.memory_info().rss)
            time.sleep(0.001)

    original = Engine.run

    def run(self, *args, **kwargs):
        seen["base"] = seen["peak"] = process.memory_info().rss
        running.set()
        try:
            return original(self, *args, **kwargs)
        finally:
            running.clear()

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    Engine.run = run
    try:
        yield out
    finally:
        Engine.run = original
        done.set()
        thread.join()
        out["grew"] = seen["peak"] - (seen["base"] or seen["peak"])


def naive_cell(model: ii.Model, clean, corrupt, metric, layer: int, pos: int) -> torch.Tensor:
    """The corrupted run with the clean residual stream at (layer, pos): one plain hook."""
    module = model.module
    blocks = module.model.layers
    saved = {}
    grab = blocks[layer].register_forward_pre_hook(
        lambda m, args: saved.__setitem__("h", args[0].clone()))
    with torch.no_grad():
        module(input_ids=clean)
    grab.remove()

    def put(m, args):
        h = args[0].clone()
        h[:, pos] = saved["h"][:, pos]
        return (h, *args[1:])

    patch = blocks[layer].register_forward_pre_hook(put)
    try:
        with torch.no_grad():
            logits = module(input_ids=corrupt).logits
    finally:
        patch.remove()
    return metric.bind(model, clean.shape[0])(logits[:, -1:]).float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--fraction", type=float, default=0.25)
    parser.add_argument("--layers", default="0,11,21", help="comma-separated, or 'all'")
    parser.add_argument("--positions", default="all", help="comma-separated, or 'all'")
    args = parser.parse_args()
    torch.manual_seed(0)
    config = LlamaConfig(**TINYLLAMA)
    model = ii.wrap(LlamaForCausalLM(config).eval())
    params = sum(p.numel() for p in model.module.parameters())
    clean = torch.randint(0, config.vocab_size, (args.prompts, args.tokens))
    corrupt = clean.clone()
    corrupt[:, args.tokens // 2] = torch.randint(0, config.vocab_size, (args.prompts,))
    metric = ii.logit_diff(11, 12)
    layers = (list(range(config.num_hidden_layers)) if args.layers == "all"
              else [int(x) for x in args.layers.split(",")])
    positions = None if args.positions == "all" else [int(x) for x in args.positions.split(",")]
    before, budget = rss_peak(), memory.budget(torch.device("cpu"), args.fraction)
    start = time.perf_counter()
    with chunk_peak() as chunks:
        result = ii.patch_sweep(model, clean, corrupt, metric, layers=layers,
                                positions=positions, memory_fraction=args.fraction)
    seconds = time.perf_counter() - start
    growth = max(0, rss_peak() - before)
    chunking = result.patcher.engine().chunking
    print(f"model: Llama shape, {params / 1e9:.2f}B parameters, float32, "
          f"{params * 4 / 2**30:.1f} GiB of weights; prompts {args.prompts} x {args.tokens}")
    print(f"sweep: resid_pre, layers {layers} x positions {args.positions}, {seconds:.0f} s")
    print(f"chunking: {chunking}")
    print(f"memory: budget {budget / 2**20:.0f} MiB a chunk ({args.fraction} of free memory, "
          f"64 MiB at least), the engine's estimate of its largest chunk "
          f"{chunking['estimated_peak_mib']:.0f} MiB; resident memory grew "
          f"{chunks['grew'] / 2**20:.0f} MiB while the chunks ran and {growth / 2**20:.0f} MiB "
          f"over the whole sweep, recordings included (on the CPU the allocator's reuse of "
          f"freed pages blurs both; CUDA's max_memory_allocated is exact)")
    worst = 0.0
    cols = result.positions
    for li, pi in ((0, 0), (len(layers) // 2, len(cols) // 2), (len(layers) - 1, len(cols) - 1)):
        want = naive_cell(model, clean, corrupt, metric, layers[li], cols[pi])
        worst = max(worst, float((result.per_prompt[li, pi] - want).abs().max()))
    print(f"exactness: max |sweep - plain hooks| over 3 cells = {worst:.2e}")


if __name__ == "__main__":
    main()
