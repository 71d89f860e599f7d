"""Interventions on an attribution graph's nodes, three ways, so the graph can be checked:

- ``predicted``: the graph's own answer, by propagating the change along its edges (each
  feature responding to a change of its pre-activation one for one, as an active ReLU or
  JumpReLU does);
- ``frozen``: a forward of the frozen replacement model (patterns and norm scales frozen,
  each MLP replaced by its transcoder, errors constant) in which every active feature is its
  pre-activation (the active set fixed) and the edited nodes are set: equal to ``predicted``
  when every feature was expanded;
- ``unfrozen``: the model itself, attention and norms live, each MLP replaced by its
  transcoder with the real nonlinearity and the recorded error (``errors="frozen"``), or the
  model's own MLP plus the edit's change of the decoder output (``errors="live"``).

Edits map node ids to a value (the feature's new activation; 0 zeroes it), or to
``("scale", c)``; error and token nodes take a scale (0 removes them).

>>> r = graph.intervene({"f2.14.305": 0, "f3.14.12": ("scale", 2.0)})   # doctest: +SKIP
>>> r.top_after                                                          # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch

from ipy_intervene.arch.sites import Adapter, get_path
from ipy_intervene.circuit.replacement import (Recording, frozen, mlp_module, mlp_out_module,
                                               replace_mlp, wide_dtype)
from ipy_intervene.errors import InputError
from ipy_intervene.infra.hooks import HookSession, input_key, replace_input

Edits = dict[tuple, tuple[str, float]]   # ("f", layer, pos, latent) / ("e", layer, pos) / ("t", pos)


def parse_edits(nodes: Any, edits: Mapping[str, Any]) -> Edits:
    """``{"f2.14.305": 0, "e1.3": ("scale", 0)}`` as keys of :data:`Edits`."""
    out: Edits = {}
    for node_id, how in edits.items():
        key = nodes.key(node_id)
        if key[0] == "logit":
            raise InputError(f"{node_id} is an output node; edit features, errors or tokens")
        if isinstance(how, (int, float)) and not isinstance(how, bool):
            if key[0] != "f":
                raise InputError(f"{node_id}: an error or token node takes ('scale', c); a "
                                 "value sets a feature's activation")
            out[key] = ("set", float(how))
        elif isinstance(how, tuple) and len(how) == 2 and how[0] in ("scale", "set") and \
                isinstance(how[1], (int, float)):
            if how[0] == "set" and key[0] != "f":
                raise InputError(f"{node_id}: only a feature's activation can be set")
            out[key] = (how[0], float(how[1]))
        else:
            raise InputError(f"{node_id}: {how!r}; expected a number (the new activation) or "
                             "('scale', c)")
    return out


def frozen_values(module: Any, adapter: Adapter, rec: Recording, tcs: dict, nodes: Any,
                  targets: list[tuple], *, acts: dict | None = None, linear: bool = False,
                  edits: Edits | None = None, error_scale: float = 1.0,
                  embed_scale: float = 1.0) -> torch.Tensor:
    """Each target's input (``("feature", i)``: its pre-activation; ``("logit", i)``) in one
    frozen forward: features fixed at ``acts`` (default: their activations on the prompt),
    or with ``linear`` each active one equal to its pre-activation; ``edits`` applied."""
    edits = edits or {}
    inputs: dict[int, torch.Tensor] = {}
    seen: dict[str, Any] = {}
    base = {layer: tc.encode(rec.mlp_in[layer].to(tc.W_enc.dtype)).detach()
            for layer, tc in tcs.items()}
    chosen = base if acts is None else acts

    def mlp(layer: int, x: torch.Tensor) -> torch.Tensor:
        inputs[layer] = x
        tc = tcs[layer]
        if linear:
            a = tc.pre_activation(x[0].to(tc.W_enc.dtype)) * (base[layer] != 0)
        else:
            a = chosen[layer].clone()
        a = _edit_features(a, base[layer], layer, edits)
        err = (rec.mlp_out[layer] - tc.decode(base[layer])) * error_scale
        err = _edit_errors(err, layer, edits)
        return (tc.decode(a) + err).to(x.dtype)[None]

    def embed(x: torch.Tensor) -> torch.Tensor:
        scale = torch.full((x.shape[1], 1), embed_scale, dtype=x.dtype)
        for key, (_, c) in edits.items():
            if key[0] == "t":
                scale[key[1]] *= c
        return rec.emb[None] * scale

    with torch.no_grad(), frozen(module, adapter, rec, mlp=mlp, embed=embed, seen=seen) as run:
        run(1)
    return _read(module, adapter, tcs, nodes, targets, inputs, seen["final"])


@torch.no_grad()
def _read(module: Any, adapter: Adapter, tcs: dict, nodes: Any, targets: list[tuple],
          inputs: dict[int, torch.Tensor], final: torch.Tensor) -> torch.Tensor:
    unembed = get_path(module, adapter.unembed)
    out = []
    for kind, index in targets:
        if kind == "feature":
            layer, pos, latent, _ = nodes.features[index]
            tc = tcs[layer]
            out.append(float(inputs[layer][0, pos].to(tc.W_enc.dtype) @ tc.W_enc[:, latent]
                             + tc.b_enc[latent]))
        else:
            logits = unembed(final[0, -1])
            out.append(float(_logit(logits.to(wide_dtype(logits)), nodes, index)))
    return torch.tensor(out, dtype=torch.float64)


def _logit(logits: torch.Tensor, nodes: Any, index: int) -> torch.Tensor:
    good, bad = nodes.vectors[index]
    return logits[..., good] - (logits.mean(-1) if bad is None else logits[..., bad])


def _edit_features(a: torch.Tensor, base: torch.Tensor, layer: int, edits: Edits
                   ) -> torch.Tensor:
    for key, (how, value) in edits.items():
        if key[0] == "f" and key[1] == layer:
            _, _, pos, latent = key
            a[..., pos, latent] = value if how == "set" else base[pos, latent] * value
    return a


def _edit_errors(err: torch.Tensor, layer: int, edits: Edits) -> torch.Tensor:
    for key, (_, c) in edits.items():
        if key[0] == "e" and key[1] == layer:
            err = err.clone()
            err[key[2]] *= c
    return err


def predicted(graph: Any, edits: Edits) -> torch.Tensor:
    """The change of every target's input the graph predicts for ``edits`` (rows in
    ``graph.target_rows`` order): relative changes ``x`` propagated along the edges, a
    feature's ``x = (A @ x) / activation`` unless it is edited."""
    nodes, adj = graph.nodes, graph.adjacency.double()
    n = adj.shape[0]
    x = torch.zeros(n, dtype=torch.float64)
    fixed = torch.zeros(n, dtype=torch.bool)
    act = torch.ones(n, dtype=torch.float64)
    for i, feat in enumerate(nodes.features):
        act[i] = feat[3]
    for key, (how, value) in edits.items():
        i = nodes.index_of(key)
        x[i] = (value / act[i] - 1) if how == "set" else value - 1
        fixed[i] = True
    free = torch.zeros(n, dtype=torch.bool)
    free[:len(nodes.features)] = True
    free &= ~fixed
    for _ in range(nodes.n_layers + 1):
        change = adj @ x
        x = torch.where(free, change / act, x)
    return (adj @ x)[graph.target_rows]


def unfrozen_logits(graph: Any, edits: Edits, errors: str = "frozen") -> torch.Tensor:
    """The last-position logits of the model with attention and norms live, each MLP
    replaced by its transcoder (real nonlinearity) plus the recorded error (``"frozen"``),
    or the model's own MLP plus the change the edits make to the decoder's output
    (``"live"``)."""
    if errors not in ("frozen", "live"):
        raise InputError(f"errors={errors!r}: expected 'frozen' or 'live'")
    ctx = graph._context
    module, adapter, rec, tcs = ctx["model"].module, ctx["adapter"], ctx["rec"], \
        ctx["transcoders"]
    with torch.no_grad(), HookSession() as session:
        for layer, tc in tcs.items():
            err = rec.mlp_out[layer] - tc.decode(ctx["acts"][layer])
            _unfrozen_mlp(session, module, adapter, layer, tc, err, edits, errors)
        if any(key[0] == "t" for key in edits):
            session.pre(adapter.block(module, 0), _scale_tokens(edits))
        out = module(input_ids=rec.input_ids)
    logits = out.logits if hasattr(out, "logits") else out[0]
    return logits[0, -1].detach()


def _unfrozen_mlp(session: HookSession, module: Any, adapter: Adapter, layer: int, tc: Any,
                  err: torch.Tensor, edits: Edits, errors: str) -> None:
    """What the MLP adds: ``decode(edited latents) + err`` (``"frozen"``), or the model's own
    output plus ``decode(edited) - decode(latents)`` (``"live"``); latents from its input."""
    def latents(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = tc.encode(x[0].to(tc.W_enc.dtype))
        return a, _edit_features(a.clone(), a, layer, edits)

    if errors == "frozen":
        def replaced(layer_: int, x: torch.Tensor) -> torch.Tensor:
            a2 = latents(x)[1]
            return (tc.decode(a2) + _edit_errors(err, layer, edits)).to(x.dtype)[None]
        replace_mlp(session, module, adapter, layer, replaced, None)
        return
    box: list[torch.Tensor] = []
    session.pre(mlp_module(module, adapter, layer),
                lambda m, args, kwargs: box.append(args[0] if args else
                                                   kwargs[input_key(args, kwargs)]))

    def add_change(m: Any, args: tuple, output: Any) -> Any:
        a, a2 = latents(box.pop())
        first = output[0] if isinstance(output, tuple) else output
        new = first + (tc.decode(a2) - tc.decode(a)).to(first.dtype)[None]
        return (new, *output[1:]) if isinstance(output, tuple) else new
    session.post(mlp_out_module(module, adapter, layer), add_change)


def _scale_tokens(edits: Edits) -> Callable:
    def hook(block: Any, args: tuple, kwargs: dict) -> Any:
        key = input_key(args, kwargs)
        x = (args[0] if key == 0 else kwargs[key]).clone()
        for k, (_, c) in edits.items():
            if k[0] == "t":
                x[:, k[1]] *= c
        return replace_input(args, kwargs, key, x)
    return hook
