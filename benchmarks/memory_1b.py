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
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import ipy_intervene as ii
from ipy_intervene.sweep import memory

TINYLLAMA = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                 num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
                 max_position_embeddings=2048)


def rss_peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


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
    parser.add_argument("--layers", default="0,11,21")
    args = parser.parse_args()
    torch.manual_seed(0)
    config = LlamaConfig(**TINYLLAMA)
    model = ii.wrap(LlamaForCausalLM(config).eval())
    params = sum(p.numel() for p in model.module.parameters())
    clean = torch.randint(0, config.vocab_size, (args.prompts, args.tokens))
    corrupt = clean.clone()
    corrupt[:, args.tokens // 2] = torch.randint(0, config.vocab_size, (args.prompts,))
    metric = ii.logit_diff(11, 12)
    layers = [int(x) for x in args.layers.split(",")]
    before, budget = rss_peak(), memory.budget(torch.device("cpu"), args.fraction)
    start = time.perf_counter()
    result = ii.patch_sweep(model, clean, corrupt, metric, layers=layers,
                            memory_fraction=args.fraction)
    seconds = time.perf_counter() - start
    growth = max(0, rss_peak() - before)
    chunking = result.patcher.engine().chunking
    print(f"model: Llama shape, {params / 1e9:.2f}B parameters, float32, "
          f"{params * 4 / 2**30:.1f} GiB of weights; prompts {args.prompts} x {args.tokens}")
    print(f"sweep: resid_pre, layers {layers} x {args.tokens} positions, {seconds:.0f} s")
    print(f"chunking: {chunking}")
    print(f"memory: peak grew {growth / 2**20:.0f} MiB during the sweep (recordings included); "
          f"budget for one chunk {budget / 2**20:.0f} MiB ({args.fraction} of free memory); "
          f"ratio {growth / budget:.2f}")
    worst = 0.0
    for li, pos in ((0, 0), (len(layers) // 2, args.tokens // 2), (len(layers) - 1,
                                                                    args.tokens - 1)):
        want = naive_cell(model, clean, corrupt, metric, layers[li], pos)
        got = result.per_prompt[li, pos]
        worst = max(worst, float((got - want).abs().max()))
    print(f"exactness: max |sweep - plain hooks| over 3 cells = {worst:.2e}")


if __name__ == "__main__":
    main()
