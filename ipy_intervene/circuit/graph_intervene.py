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
                                               replace_mlp, unembedded)
from ipy_intervene.errors import InputError
from ipy_intervene.features.clt import Replacement
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


def frozen_values(module: Any, adapter: Adapter, rec: Recording, tcs: Replacement, nodes: Any,
                  targets: list[tuple], *, acts: dict | None = None, linear: bool = False,
                  edits: Edits | None = None, error_scale: float = 1.0,
                  embed_scale: float = 1.0) -> torch.Tensor:
    """Each target's input (``("feature", i)``: its pre-activation; ``("logit", i)``) in one
    frozen forward: features fixed at ``acts`` (default: their activations on the prompt),
    or with ``linear`` each active one equal to its pre-activation; ``edits`` applied."""
    edits = edits or {}
    inputs: dict[int, torch.Tensor] = {}
    seen: dict[str, Any] = {}
    base = {layer: tcs.encode(layer, rec.mlp_in[layer]).detach()
            for layer in range(tcs.n_layers)}
    chosen = base if acts is None else acts
    current: dict[int, torch.Tensor] = {}     # this forward's activations, layer by layer

    def mlp(layer: int, x: torch.Tensor) -> torch.Tensor:
        inputs[layer] = x
        if linear:
            a = tcs.pre_activation(layer, x[0]) * (base[layer] != 0)
        else:
            a = chosen[layer].clone()
        current[layer] = _edit_features(a, base[layer], layer, edits)
        err = (rec.mlp_out[layer] - tcs.decode(layer, base)) * error_scale
        err = _edit_errors(err, layer, edits)
        return (tcs.decode(layer, current) + err).to(x.dtype)[None]

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
def _read(module: Any, adapter: Adapter, tcs: Replacement, nodes: Any,
          targets: list[tuple], inputs: dict[int, torch.Tensor], final: torch.Tensor
          ) -> torch.Tensor:
    out = []
    for kind, index in targets:
        if kind == "feature":
            layer, pos, latent, _ = nodes.features[index]
            w = tcs.encoder(layer)[:, latent]
            out.append(float(inputs[layer][0, pos].to(w.dtype) @ w
                             + tcs.enc_bias(layer)[latent]))
        else:
            out.append(float(_logit(unembedded(module, adapter, final[0, -1]), nodes, index)))
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


def unfrozen_logits(graph: Any, edits: Edits, errors: str = "frozen"
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The last-position logits of the model with attention and norms live, each MLP
    replaced by its transcoder (real nonlinearity) plus the recorded error (``"frozen"``),
    or the model's own MLP plus the change the edits make to the decoder's output and to
    the error (``"live"``): the model's logits, and the logits the output nodes read (before
    any soft-cap, :func:`~ipy_intervene.circuit.replacement.unembedded`)."""
    check_errors(errors)
    ctx = graph._context
    module, adapter, rec, tcs = ctx["model"].module, ctx["adapter"], ctx["rec"], \
        ctx["transcoders"]
    at = lambda pos: (torch.tensor([0]), torch.tensor([pos]))  # noqa: E731 - one prompt
    seen: dict[str, Any] = {}
    state: dict[str, dict] = {}
    with torch.no_grad(), HookSession() as session:
        for layer in range(tcs.n_layers):
            err = rec.mlp_out[layer] - tcs.decode(layer, ctx["acts"])
            _unfrozen_mlp(session, module, adapter, layer,
                          MlpEdit(tcs, layer, err, edits, at, errors, state))
        if any(key[0] == "t" for key in edits):
            session.pre(adapter.block(module, 0), _scale_tokens(edits, at))
        session.pre(get_path(module, adapter.unembed), _keep_final(seen))
        out = module(input_ids=rec.input_ids)
        raw = unembedded(module, adapter, seen["final"][0, -1])
    logits = out.logits if hasattr(out, "logits") else out[0]
    return logits[0, -1].detach(), raw.detach()


def check_errors(errors: str) -> None:
    if errors not in ("frozen", "live"):
        raise InputError(f"errors={errors!r}: expected 'frozen' (each MLP replaced by its "
                         "transcoder plus the error recorded on the graph's prompt) or 'live' "
                         "(each MLP's own output plus the change the edits make)")


class MlpEdit:
    """What one MLP adds once the edits are made, for a batch ``[B, T, d]``: ``"frozen"``:
    ``decode(edited latents) + edited recorded error`` (the rows are the graph's prompt);
    ``"live"``: the MLP's own output ``out`` plus ``decode(edited) - decode(latents)`` plus
    ``(c - 1) * (out - decode(latents))`` where an error node is scaled by ``c``. ``at(pos)``
    gives the ``(rows, positions)`` of the graph's position ``pos`` in the batch. ``state``
    (one per forward, shared by the layers' edits) keeps each layer's latents, read by the
    later layers a cross-layer transcoder's decoders write to."""

    def __init__(self, tcs: Replacement, layer: int, err: torch.Tensor, edits: Edits,
                 at: Callable[[int], tuple[torch.Tensor, torch.Tensor]], errors: str,
                 state: dict[str, dict]) -> None:
        self.tcs, self.layer, self.err, self.at, self.errors = tcs, layer, err, at, errors
        self.edits = {k: v for k, v in edits.items() if k[0] in "fe" and k[1] == layer}
        # live: a layer runs when a feature edit's decoders reach it, or an error edit at a
        # later layer needs its latents (the error is the MLP output minus every decoder's)
        self.reached = any(k[0] == "f" and layer in tcs.targets(k[1]) for k in edits) or \
            any(k[0] == "e" and layer in tcs.sources(k[1]) for k in edits)
        self.state = state

    @property
    def needed(self) -> bool:
        """Whether the MLP's output changes or its latents are read later (always under
        frozen errors)."""
        return self.errors == "frozen" or bool(self.edits) or self.reached

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
        tcs, layer = self.tcs, self.layer
        a = tcs.encode(layer, x)
        a2 = a.clone()
        for key, (how, value) in self.edits.items():
            if key[0] == "f":
                rows, pos = self.at(key[2])
                a2[rows, pos, key[3]] = value if how == "set" else a[rows, pos, key[3]] * value
        before, after = self.state.setdefault("a", {}), self.state.setdefault("a2", {})
        before[layer], after[layer] = a, a2
        if self.errors == "frozen":
            return (tcs.decode(layer, after) + _edit_errors(self.err, layer, self.edits)
                    ).to(x.dtype)
        change = torch.zeros_like(out, dtype=a.dtype)
        for source in tcs.sources(layer):   # the layers that ran hold latents (edited ones)
            if source in after:
                change = change + (after[source] - before[source]) @ \
                    tcs.decoder(source, layer)
        for key, (_, c) in self.edits.items():
            if key[0] == "e":       # every source layer ran (``reached``): its error is known
                decoded = tcs.decode(layer, before)
                rows, pos = self.at(key[2])
                change[rows, pos] += (c - 1) * (out[rows, pos].to(change.dtype)
                                                - decoded[rows, pos])
        return out + change.to(out.dtype)


def _unfrozen_mlp(session: HookSession, module: Any, adapter: Adapter, layer: int,
                  edit: MlpEdit) -> None:
    if edit.errors == "frozen":
        replace_mlp(session, module, adapter, layer, lambda _, x: edit(x, None), None)
        return
    if not edit.needed:
        return
    box: list[torch.Tensor] = []
    session.pre(mlp_module(module, adapter, layer),
                lambda m, args, kwargs: box.append(args[0] if args else
                                                   kwargs[input_key(args, kwargs)]))

    def add_change(m: Any, args: tuple, output: Any) -> Any:
        first = output[0] if isinstance(output, tuple) else output
        new = edit(box.pop(), first)
        return (new, *output[1:]) if isinstance(output, tuple) else new
    session.post(mlp_out_module(module, adapter, layer), add_change)


def scale_tokens(x: torch.Tensor, edits: Edits, at: Callable) -> torch.Tensor:
    """Block 0's input ``x [B, T, d]`` with the edited token nodes scaled."""
    x = x.clone()
    for key, (_, c) in edits.items():
        if key[0] == "t":
            rows, pos = at(key[1])
            x[rows, pos] *= c
    return x


def _scale_tokens(edits: Edits, at: Callable) -> Callable:
    def hook(block: Any, args: tuple, kwargs: dict) -> Any:
        key = input_key(args, kwargs)
        x = args[0] if key == 0 else kwargs[key]
        return replace_input(args, kwargs, key, scale_tokens(x, edits, at))
    return hook


def _keep_final(seen: dict[str, Any]) -> Callable:
    def hook(unembed: Any, args: tuple, kwargs: dict) -> None:
        key = input_key(args, kwargs)
        seen.setdefault("final", args[0] if key == 0 else kwargs[key])
    return hook


# -- in a %%trace cell ------------------------------------------------------------------------

def apply_in_trace(graph: Any, model: Any, edits: Edits, errors: str, align: str) -> None:
    """Make ``edits`` in the running trace through its envoys (``model``: the cell's model):
    block 0's input for token nodes, then each MLP's input read and its output written, in
    forward order. Rows of other prompts take the graph's positions counted from their first
    token (``align="start"``) or from their last (``"end"``)."""
    check_errors(errors)
    if align not in ("start", "end"):
        raise InputError(f"align={align!r}: expected 'start' (the graph's position p is token "
                         "p of each prompt) or 'end' (counted from each prompt's last token)")
    ctx = graph._context
    adapter, rec, tcs = ctx["adapter"], ctx["rec"], ctx["transcoders"]
    state: dict[str, dict] = {}
    args, kwargs = model.inputs
    ids = kwargs.get("input_ids", args[0] if args else None)
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise InputError("apply reads the trace's token ids (input_ids [batch, positions]); "
                         "this trace's model input has none (inputs_embeds?)")
    mask = kwargs.get("attention_mask")
    at = batch_positions(ids, mask, graph.nodes.n_pos, align)
    if errors == "frozen":
        _check_same_prompt(ids, mask, rec.input_ids)
    if any(key[0] == "t" for key in edits):
        block0 = adapter.block(model, 0)
        block0.input = scale_tokens(block0.input, edits, at)
    for layer in range(tcs.n_layers):
        err = rec.mlp_out[layer] - tcs.decode(layer, ctx["acts"])
        edit = MlpEdit(tcs, layer, err, edits, at, errors, state)
        if not edit.needed:
            continue
        block = adapter.block(model, layer)
        x = get_path(block, adapter.mlp).input
        writer = get_path(block, adapter.writer("mlp"))
        writer.output = edit(x, None if errors == "frozen" else writer.output)


def batch_positions(ids: torch.Tensor, mask: torch.Tensor | None, n_pos: int, align: str
                    ) -> Callable[[int], tuple[torch.Tensor, torch.Tensor]]:
    """``at(pos)``: the rows and padded positions of the graph's position ``pos`` in a
    left-padded batch; a prompt too short for it is an InputError."""
    width = ids.shape[1]
    lengths = [width] * ids.shape[0] if mask is None else [int(n) for n in mask.sum(1)]
    rows = torch.arange(len(lengths), device=ids.device)

    def at(pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        if align == "start":
            index = [width - n + pos if pos < n else -1 for n in lengths]
        else:
            index = [width - (n_pos - pos) if n_pos - pos <= n else -1 for n in lengths]
        if -1 in index:
            row = index.index(-1)
            raise InputError(f"the graph's position {pos} (of {n_pos}) is not in prompt "
                             f"{row} of this trace ({lengths[row]} tokens) counted from its "
                             f"{align}; edit positions every prompt has, or align="
                             f"{'end' if align == 'start' else 'start'}")
        return rows, torch.tensor(index, device=ids.device)
    return at


def _check_same_prompt(ids: torch.Tensor, mask: torch.Tensor | None, prompt: torch.Tensor
                       ) -> None:
    same = ids.shape[1] == prompt.shape[1] and bool((ids == prompt.to(ids.device)).all()) \
        and (mask is None or bool(mask.bool().all()))
    if not same:
        raise InputError("errors='frozen' writes the error recorded on the graph's prompt, so "
                         "every prompt of the trace must be the graph's prompt; for other "
                         "prompts use errors='live' (each MLP's own output plus the change "
                         "the edits make)")
