"""One forward of the model over the component graph: every receiver reads its own input.

A :class:`GraphRun` installs hooks (in a :class:`~ipy_intervene.infra.hooks.HookSession`) that

- record each sender's write in this run (``current``): the residual entering block 0, each
  head's ``result`` (computed from ``z`` at the out-projection's input), or under a
  post-norm each ``ATTN{l}`` (that norm's output), each MLP's write (its post-norm's output
  where it has one);
- give each receiver the input ``resid + delta``: ``resid`` is the residual stream the
  model itself computed (the sum of the current writes of the senders upstream, plus the
  out-projection biases), ``delta`` is, for the patched edges ``u -> v``, the sum of
  ``source_u - current_u`` (so v reads u's write from the source run and every other sender's
  write from this run); that input is a tensor only the receiver's norm reads (an expanded
  view for a layer's q/k/v receivers), so its gradient is ``d metric / d input_v``;
- run a layer's q/k/v projections per receiver when its receivers read different inputs
  (each receiver's columns of the projection from its own normed input), and the model's own
  projection otherwise (so a run without patched edges is the model's own forward, exactly).

>>> run = GraphRun(graph, root, grad=True)                        # doctest: +SKIP
>>> with HookSession() as session:                                 # doctest: +SKIP
...     run.install(session)
...     logits = root(**kwargs).logits
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ipy_intervene.arch.attention import head_results
from ipy_intervene.arch.sites import get_path, split_heads
from ipy_intervene.circuit.graph import Graph, Slot
from ipy_intervene.errors import InputError, SiteError
from ipy_intervene.infra.hooks import HookSession, edit_names, tap

Writes = list[torch.Tensor]


class GraphRun:
    """The hooks of one forward; see the module docstring. ``patched``: ``[senders,
    receivers]`` bool, the edges that carry ``source`` writes; ``embed``: a function giving
    block 0's input from the model's (EAP-IG's interpolation); ``grad``: leaves to
    differentiate; ``check``: verify that the writes add up to the final residual."""

    def __init__(self, graph: Graph, root: nn.Module, *, source: Writes | None = None,
                 patched: torch.Tensor | None = None, grad: bool = False,
                 embed: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 check: bool = False) -> None:
        if (source is None) != (patched is None):
            raise ValueError("GraphRun needs both `source` and `patched`, or neither")
        self.graph, self.root, self.grad, self.embed, self.check = graph, root, grad, embed, check
        self.source = source
        self.patched = None if patched is None else patched & graph.upstream
        self.current: list[torch.Tensor | None] = [None] * len(graph.senders)
        self.leaves: dict[int, torch.Tensor] = {}     # first receiver index -> its input
        self._normed: dict[int, torch.Tensor] = {}
        self._resid: dict[int, torch.Tensor] = {}     # layer -> the shared norm's input

    # -- installing -------------------------------------------------------------------------

    def install(self, session: HookSession) -> None:
        g, root = self.graph, self.root
        tap(session, g.block(root, 0), True, self._embed)
        for layer in range(g.n_layers):
            receivers = list(g.attn_receivers(layer))
            tap(session, g.part(root, layer, "attn_norm"), True,   # attn itself: no pre-norm
                lambda x, layer=layer, r=receivers: self._attn_inputs(layer, r, x))
            if self.grad or self._touched(receivers):
                self._replace_projections(session, layer)
            tap(session, g.part(root, layer, "out_proj"), True,
                lambda z, layer=layer: self._heads(layer, z))
            if not g.head_senders:      # a post-norm: attention's write is that norm's output
                tap(session, g.part(root, layer, "attn_writer"), False,
                    lambda out, s=g.head_sender(layer, 0): self._keep(s, out))
            mlp = g.mlp_receiver(layer)
            if g.shared_norm:       # the MLP reads attention's norm: its own input, normed
                tap(session, g.part(root, layer, "mlp"), True,
                    lambda x, layer=layer, r=mlp: self._shared_input(layer, r, x))
            else:
                tap(session, g.part(root, layer, "mlp_norm"), True,
                    lambda x, r=mlp: self._single_input(r, x))
            tap(session, g.part(root, layer, "mlp_writer"), False,
                lambda out, s=g.mlp_sender(layer): self._keep(s, out))
        tap(session, g.final_norm(root), True, self._final)
        if self.check:
            self._check_reads(session)

    def _check_reads(self, session: HookSession) -> None:
        """The map's norms are what the projections and the MLP read: each q/k/v projection's
        input is ``attn_norm``'s output, the MLP's is ``mlp_norm``'s; where the map has no
        pre-norm (OLMo 2/3), the residual stream itself: the block's input for attention, that
        plus attention's write for the MLP (else a receiver's input would not be what the
        graph says; a SiteError naming the map and the module)."""
        g, root, normed = self.graph, self.root, {}
        assert g.layout is not None
        paths = sorted({slot.projection for slot in g.slots})
        for layer in range(g.n_layers):
            self._expected_reads(session, layer, normed)
            reads = [(get_path(g.block(root, layer), p), "attn_norm", p) for p in paths]
            reads.append((g.part(root, layer, "mlp"), "mlp_norm", g.adapter.mlp))
            for module, name, path in reads:
                tap(session, module, True,
                    lambda x, key=(layer, name), path=path: _same(normed, key, x, g, path))

    def _expected_reads(self, session: HookSession, layer: int, normed: dict) -> None:
        """Hooks that put in ``normed`` what attention's projections and the MLP must read."""
        g, root, layout = self.graph, self.root, self.graph.layout
        assert layout is not None
        put = normed.__setitem__
        tap(session, g.block(root, layer), True, lambda x: put((layer, "in"), x))
        if not layout.attn_normed:      # the stream itself: the block's input
            tap(session, g.block(root, layer), True, lambda x: put((layer, "attn_norm"), x))
        else:
            tap(session, g.part(root, layer, "attn_norm"), False,
                lambda out: put((layer, "attn_norm"), out))
        if layout.mlp_normed:
            tap(session, g.part(root, layer, "mlp_norm"), False,
                lambda out: put((layer, "mlp_norm"), out))
        elif g.parallel:                # the stream itself: the block's input, or resid_mid
            tap(session, g.block(root, layer), True, lambda x: put((layer, "mlp_norm"), x))
        else:
            tap(session, g.part(root, layer, "attn_writer"), False,
                lambda out: put((layer, "mlp_norm"), normed[(layer, "in")] + out))

    def _touched(self, receivers: list[int]) -> bool:
        return self.patched is not None and bool(self.patched[:, receivers].any())

    def _replace_projections(self, session: HookSession, layer: int) -> None:
        block = self.graph.block(self.root, layer)
        by_module: dict[str, list[Slot]] = {}
        for slot in self.graph.slots:
            by_module.setdefault(slot.projection, []).append(slot)
        for path, slots in by_module.items():
            module = get_path(block, path)
            plan = _plan(module, slots)
            session.replace_forward(module, lambda original, m=module, p=plan, l=layer:
                                    self._projection(original, m, p, l))

    def _projection(self, original: Callable, module: nn.Module, plan: tuple,
                    layer: int) -> Callable:
        def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            normed = self._normed.get(layer)
            if normed is None or args or kwargs:
                return original(x, *args, **kwargs)
            return _project(module, normed, plan)
        return forward

    # -- the hooks ---------------------------------------------------------------------------

    def _embed(self, x: torch.Tensor) -> torch.Tensor | None:
        new = None if self.embed is None else self.embed(x)
        if self.grad and not (x if new is None else new).requires_grad:
            new = (x if new is None else new).detach().requires_grad_(True)  # frozen weights
        self.current[0] = (x if new is None else new).detach()
        return new

    def _attn_inputs(self, layer: int, receivers: list[int], resid: torch.Tensor) -> None:
        """The layer's attention receivers' inputs, normed, for the projections."""
        self._normed.pop(layer, None)
        if self.graph.shared_norm:
            self._resid[layer] = resid
        delta = self._delta(receivers, resid)
        if delta is None and not self.grad:
            return None
        shape = (*resid.shape[:-1], len(receivers), resid.shape[-1])
        inputs = resid[:, :, None, :].expand(shape)   # read by the receivers alone
        inputs = inputs + delta if delta is not None else inputs
        self._differentiate(receivers[0], inputs)
        if self.graph.layout is not None and not self.graph.layout.attn_normed:
            self._normed[layer] = inputs            # no pre-norm: the projections read it
            return None
        norm = self.graph.part(self.root, layer, "attn_norm")
        self._normed[layer] = norm.forward(inputs)  # .forward: not the hooks of the norm
        return None

    def _single_input(self, receiver: int, resid: torch.Tensor) -> torch.Tensor | None:
        delta = self._delta([receiver], resid)
        if delta is None and not self.grad:
            return None
        out = resid.view_as(resid) if delta is None else resid + delta[:, :, 0]
        self._differentiate(receiver, out)          # a tensor of its own: the norm reads it
        return out

    def _shared_input(self, layer: int, receiver: int, normed: torch.Tensor
                      ) -> torch.Tensor | None:
        """The MLP's input where it shares attention's norm (GPT-J, parallel StableLM): the
        norm of the receiver's own residual input (the norm's input this layer, plus its
        patched edges), a tensor only this norm call reads, so its gradient is ``d metric /
        d input_v``; the model's own input when nothing changes it."""
        resid = self._resid.pop(layer)
        delta = self._delta([receiver], resid)
        if delta is None and not self.grad:
            return None
        own = resid.view_as(resid) if delta is None else resid + delta[:, :, 0]
        self._differentiate(receiver, own)
        return self.graph.part(self.root, layer, "mlp_norm").forward(own).to(normed.dtype)

    def _heads(self, layer: int, z: torch.Tensor) -> None:
        self._normed.pop(layer, None)
        if not self.graph.head_senders:     # ATTN{layer}: the post-norm's output, kept there
            return None
        proj = self.graph.part(self.root, layer, "out_proj")
        heads = head_results(proj, split_heads(z, self.graph.n_heads)).detach()
        for h, write in enumerate(heads.unbind(2)):
            self.current[self.graph.head_sender(layer, h)] = write
        return None

    def _keep(self, sender: int, out: torch.Tensor) -> None:
        self.current[sender] = out.detach()
        return None

    def _final(self, resid: torch.Tensor) -> torch.Tensor | None:
        if self.check:
            check_sum(self.graph, self.root, self.current, resid)
        return self._single_input(self.graph.logits_receiver, resid)

    # -- the algebra -------------------------------------------------------------------------

    def _delta(self, receivers: list[int], resid: torch.Tensor) -> torch.Tensor | None:
        """``[batch, pos, len(receivers), d_model]``: sum of ``source_u - current_u`` over
        each receiver's patched edges; None when none is patched."""
        if self.patched is None:
            return None
        mask = self.patched[:, receivers]
        senders = mask.any(1).nonzero().flatten().tolist()
        if not senders:
            return None
        diffs = []
        for s in senders:
            current = self.current[s]
            if current is None:
                raise RuntimeError(f"internal: sender {self.graph.senders[s].name} has not "
                                   "run before a receiver it feeds")
            diffs.append(self.source[s].to(resid.dtype) - current.to(resid.dtype))
        weights = mask[senders].to(resid.device, resid.dtype)
        return torch.einsum("bpsd,sr->bprd", torch.stack(diffs, 2), weights)

    def _differentiate(self, first: int, inputs: torch.Tensor) -> None:
        """Keep the input tensor of receivers ``first ..``: only their norm reads it, so the
        metric's gradient with respect to it is ``d metric / d input_v``."""
        if self.grad:
            self.leaves[first] = inputs

    def input_grads(self) -> list[torch.Tensor]:
        """The leaves in receiver order, for ``torch.autograd.grad``: one ``[B, P, R_l, D]``
        per layer's attention, one ``[B, P, D]`` per MLP, and the logits'."""
        g = self.graph
        firsts = []
        for layer in range(g.n_layers):
            firsts += [g.attn_receivers(layer)[0], g.mlp_receiver(layer)]
        return [self.leaves[f] for f in firsts + [g.logits_receiver]]

    def writes(self) -> Writes:
        """Every sender's write in this run, ``[batch, pos, d_model]`` each."""
        missing = [self.graph.senders[i].name for i, w in enumerate(self.current) if w is None]
        if missing:
            raise InputError(f"the forward did not reach {', '.join(missing[:4])}: edge "
                             "attribution needs every block to run")
        return list(self.current)  # type: ignore[arg-type]


def _same(normed: dict, key: tuple, x: torch.Tensor, graph: Graph, path: str) -> None:
    seen = normed.get(key)
    if seen is None or not (seen is x or (seen.shape == x.shape and torch.equal(seen, x))):
        layer, name = key
        normed = graph.layout.attn_normed if name == "attn_norm" else graph.layout.mlp_normed
        what = ("that norm's output" if normed else "the residual stream itself (the map "
                "states no norm there)")
        raise SiteError(f"the {graph.model_type!r} map says {path} reads {name}="
                        f"{getattr(graph.layout, name)!r}, but in layer {layer} its input is "
                        f"not {what}: edge attribution would read the wrong stream; "
                        f"pass adapter=ii.Adapter(..., {name}=...) with the right norm")
    return None


def _plan(module: nn.Module, slots: list[Slot]) -> tuple:
    """How one projection's slots are computed: (receiver rows: a slice when contiguous,
    column index or None when in order, inverse order or None, slot width)."""
    weight = _weight(module)
    cols = torch.cat([torch.arange(s.start, s.stop) for s in slots])
    if not torch.equal(cols.sort().values, torch.arange(weight.shape[0])):
        raise InputError(f"the q/k/v projection {type(module).__name__} has {weight.shape[0]} "
                         f"output columns; the heads' slots cover {cols.numel()} of them")
    rows = [s.receiver for s in slots]
    contiguous = rows == list(range(rows[0], rows[0] + len(rows)))
    in_order = torch.equal(cols, torch.arange(cols.numel()))
    return (slice(rows[0], rows[0] + len(rows)) if contiguous else torch.tensor(rows),
            None if in_order else cols, None if in_order else torch.argsort(cols),
            slots[0].stop - slots[0].start)


def _weight(module: nn.Module) -> torch.Tensor:
    """``[out, in]`` for nn.Linear and GPT-2's Conv1D (which keeps ``[in, out]``)."""
    if type(module).__name__ == "Conv1D":
        return module.weight.T
    if isinstance(module, nn.Linear):
        return module.weight
    raise InputError(f"q/k/v projections must be nn.Linear or Conv1D; got "
                     f"{type(module).__name__}")


def _project(module: nn.Module, normed: torch.Tensor, plan: tuple) -> torch.Tensor:
    """Each slot's columns from its receiver's normed input ``[B, P, R, D]``."""
    rows, cols, order, width = plan
    weight = _weight(module)
    bias = getattr(module, "bias", None)
    if cols is not None:
        weight = weight[cols.to(weight.device)]
        bias = None if bias is None else bias[cols.to(bias.device)]
    per_slot = weight.reshape(-1, width, weight.shape[1])        # [slots, width, D]
    x = normed[:, :, rows] if isinstance(rows, slice) else normed[:, :, rows.to(normed.device)]
    y = torch.einsum("bpsi,soi->bpso", x.to(weight.dtype), per_slot).flatten(-2)
    if bias is not None:
        y = y + bias
    return y if order is None else y[..., order.to(y.device)]


def check_sum(graph: Graph, root: nn.Module, current: list, resid: torch.Tensor) -> None:
    """The senders' writes plus the out-projection biases (not under a post-norm: there
    ``ATTN{l}`` includes it) must add up to the residual entering the final norm; otherwise
    the architecture writes something the graph lacks."""
    total = sum(w.double() for w in current if w is not None)
    for layer in range(graph.n_layers if graph.head_senders else 0):
        bias = getattr(graph.part(root, layer, "out_proj"), "bias", None)
        if bias is not None:
            total = total + bias.detach().double()
    gap = float((total - resid.detach().double()).norm())
    size = float(resid.detach().double().norm())
    tol = 1e-4 if resid.dtype in (torch.float32, torch.float64) else 2e-2
    if any(w is None for w in current) or gap > tol * size + 1e-6:
        edits = edit_names(root)
        why = (f"the edits {edits} (ii.edit) write to it what no component wrote: analyse "
               "the model they were made from" if edits else f"this {graph.model_type} model "
               "writes into the stream somewhere the graph does not know (a norm after "
               "attention or the MLP?)")
        raise InputError(f"the components' writes do not add up to the residual stream "
                         f"(relative gap {gap / max(size, 1e-12):.2g}): {why}")
