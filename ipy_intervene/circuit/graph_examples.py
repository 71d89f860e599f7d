"""Where an attribution graph's features fire elsewhere: each feature node's top activating
tokens over a set of prompts (its transcoder run on the MLP inputs of the model's own
forwards), for the graph view's hover text.

>>> tops = top_activations(graph, prompts, k=5)                        # doctest: +SKIP
>>> graph.show(top_tokens=tops)                                        # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ipy_intervene.circuit.replacement import mlp_module
from ipy_intervene.features.activations import TopToken
from ipy_intervene.infra.hooks import HookSession, entry_point, input_key
from ipy_intervene.model.encode import encode

CONTEXT = 5


@entry_point
@torch.no_grad()
def top_activations(graph: Any, prompts: Sequence[str], k: int = 5,
                    nodes: Sequence[str] | None = None) -> dict[str, list[TopToken]]:
    """For each feature node of ``graph`` (or those in ``nodes``), its ``k`` strongest
    activations over ``prompts``, one prompt at a time (no padding)."""
    ctx = graph._context
    model, adapter, tcs = ctx["model"], ctx["adapter"], ctx["transcoders"]
    wanted = [i for i, node_id in enumerate(graph.ids)
              if node_id.startswith("f") and (nodes is None or node_id in nodes)]
    by_layer: dict[int, list[int]] = {}
    for i in wanted:
        by_layer.setdefault(graph.nodes.features[i][0], []).append(i)
    found: dict[int, list[TopToken]] = {i: [] for i in wanted}
    for p, prompt in enumerate(prompts):
        ids = encode(model, prompt, None)["input_ids"].to(model.device)
        inputs = _mlp_inputs(model, adapter, ids)
        tokens = [model.tokenizer.decode([t]) for t in ids[0].tolist()]
        for layer, members in by_layer.items():
            acts = tcs.encode(layer, inputs[layer])
            for i in members:
                latent = graph.nodes.features[i][2]
                column = acts[:, latent]
                for pos in column.nonzero().flatten().tolist():
                    found[i].append(TopToken(p, pos, tokens[pos], float(column[pos]),
                                             _context(tokens, pos)))
    return {graph.ids[i]: sorted(v, key=lambda t: -t.value)[:k] for i, v in found.items()}


def _mlp_inputs(model: Any, adapter: Any, ids: torch.Tensor) -> dict[int, torch.Tensor]:
    seen: dict[int, torch.Tensor] = {}
    with HookSession() as hooks:
        for layer in range(adapter.n_layers):
            def keep(m: Any, args: tuple, kwargs: dict, layer: int = layer) -> None:
                key = input_key(args, kwargs)
                seen[layer] = (args[0] if key == 0 else kwargs[key])[0]
            hooks.pre(mlp_module(model.module, adapter, layer), keep)
        model.module(input_ids=ids)
    return seen


def _context(tokens: list[str], pos: int) -> str:
    before = "".join(tokens[max(0, pos - CONTEXT):pos])
    return f"...{before}[{tokens[pos]}]"
