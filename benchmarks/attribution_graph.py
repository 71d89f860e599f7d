"""Attribution graph: batched rows (one retained forward, ``batch_size`` rows per backward)
against one forward and backward per node, on the demo model (its shipped transcoders) and
a 12-layer 768-wide GPT-2 shape (random top-k transcoders), on the CPU.

    python benchmarks/attribution_graph.py            # prints times and the ratio
    python benchmarks/attribution_graph.py --quick    # smaller shapes, for a smoke test

The naive loop is timed on a sample of nodes and scaled to the graph's row count (it is
linear in the rows by construction: one independent forward and backward each).
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

import ipy_intervene as ii
from ipy_intervene.arch.sites import adapter_for
from ipy_intervene.circuit.replacement import frozen, record
from ipy_intervene.features.sae import SAE
from ipy_intervene.model.encode import encode


def naive_seconds(model, prompt, tcs, graph, sample: int) -> float:
    """One frozen forward + backward per target row, for ``sample`` rows, scaled."""
    module, adapter = model.module, adapter_for(model)
    rec = record(module, adapter, encode(model, prompt, None)["input_ids"])
    rows = graph.target_rows.tolist()[:sample]
    start = time.perf_counter()
    for row in rows:
        leaves, inputs, seen = {}, {}, {}

        def mlp(layer, x):
            inputs[layer] = x
            leaves[layer] = rec.mlp_out[layer][None].clone().requires_grad_(True)
            return leaves[layer]
        with torch.enable_grad(), frozen(module, adapter, rec, mlp=mlp, seen=seen) as run:
            run(1)
            key = graph.nodes.key(graph.ids[row])
            if key[0] == "f":
                target = inputs[key[1]][0, key[2]] @ tcs[key[1]].W_enc[:, key[3]]
            else:
                target = module.lm_head(seen["final"][0, -1])[graph.nodes.vectors[key[1]][0]]
            torch.autograd.grad(target, list(leaves.values()), allow_unused=True)
    return (time.perf_counter() - start) / len(rows) * len(graph.target_rows)


def topk_transcoders(n_layers: int, d: int, d_sae: int, k: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    out = {}
    for layer in range(n_layers):
        tc = SAE(d, d_sae, activation="topk", k=k, d_out=d, apply_b_dec_to_input=False)
        with torch.no_grad():
            tc.W_enc.copy_(torch.randn(d, d_sae, generator=gen) / d ** 0.5)
            tc.W_dec.copy_(torch.randn(d_sae, d, generator=gen) / d ** 0.5)
        out[layer] = tc.requires_grad_(False)
    return out


def case(name, model, prompt, tcs, max_features, batch, sample) -> None:
    start = time.perf_counter()
    g = ii.attribution_graph(model, prompt, tcs, max_feature_nodes=max_features,
                             batch_size=batch)
    batched = time.perf_counter() - start
    naive = naive_seconds(model, prompt, tcs, g, sample)
    print(f"{name}: {len(g.target_rows)} rows x {g.adjacency.shape[1]} nodes "
          f"({g.nodes.n_pos} tokens): graph {batched:.1f} s, one backward per node "
          f"~{naive:.1f} s, ratio {naive / batched:.1f}x; edges add up to "
          f"{g.exactness():.1e}; peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    demo = ii.load_model("demo")
    prompt = "When Mary and John went to the store , John gave a drink to"
    case("demo (4 x 128, shipped transcoders)", demo, prompt, ii.load_transcoders("demo"),
         None, 64, 20)
    from transformers import GPT2Config, GPT2LMHeadModel

    layers, width, tokens = (4, 256, 16) if args.quick else (12, 768, 64)
    cfg = GPT2Config(vocab_size=len(demo.tokenizer), n_positions=128, n_embd=width,
                     n_layer=layers, n_head=12 if width % 12 == 0 else 8)
    big = ii.wrap(GPT2LMHeadModel(cfg).eval(), demo.tokenizer)
    words = (prompt + " ") * 8
    ids = torch.tensor(demo.tokenizer(words)["input_ids"][:tokens])
    case(f"GPT-2 shape ({layers} x {width}, top-8 transcoders)", big, ids,
         topk_transcoders(layers, width, 4 * width, 8), 512 if args.quick else 2048, 64, 8)


if __name__ == "__main__":
    main()
