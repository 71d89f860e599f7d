"""Path patching (exact, not linearised): the effect of each sender head on receiver heads'
queries, keys or values, or on the logits, through the direct path only.

As in the IOI paper (Wang et al. 2022) and TransformerLens's IOI notebook, on the clean
prompts, for each sender head:

1. run with the sender's output (its ``z``) taken from the corrupted run and every other
   head's output frozen at the clean run (MLPs and norms are recomputed); keep what the
   receivers read (their ``q``, ``k`` or ``v``), or, for ``receivers="logits"``, the metric;
2. run again, clean, with only the receivers' inputs replaced by those of step 1: the metric.

Senders are batched: every row of a forward is one (sender, prompt) pair.

>>> r = ii.path_patch(model, clean, corrupt, ii.logit_diff("Mary", "John"),  # doctest: +SKIP
...                   receivers=[(3, 0)], receiver_input="q")
>>> r.values.shape                                                            # doctest: +SKIP
torch.Size([4, 4])                     # [sender layer, sender head]; clean = 1, corrupted = 0
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import torch
from torch import nn

from ipy_intervene.analysis.inputs import prepare_pair, token_labels
from ipy_intervene.analysis.metrics import as_metric
from ipy_intervene.analysis.reads import OnLogits
from ipy_intervene.arch import attention
from ipy_intervene.arch.attention import site_point
from ipy_intervene.arch.sites import Adapter, adapter_for, get_path, split_heads
from ipy_intervene.errors import InputError
from ipy_intervene.infra.hooks import HookSession, entry_point, tap
from ipy_intervene.model.loading import warn_if_training, wrap
from ipy_intervene.sweep.heads import in_chunks
from ipy_intervene.sweep.result import SweepResult, normalised

Head = tuple[int, int]


@entry_point
@torch.no_grad()
def path_patch(model: Any, clean: Any, corrupted: Any, metric: Any, *,
               receivers: str | Sequence[Head] = "logits", receiver_input: str = "q",
               positions: Sequence[int] | None = None, batch_size: int = 16) -> SweepResult:
    """Path patching from every head (sender) to ``receivers``: a list of (layer, head)
    whose ``receiver_input`` (``"q"``, ``"k"`` or ``"v"``) is patched, or ``"logits"``.
    ``positions``: where senders and receivers are patched (default: every position).

    >>> ii.path_patch(model, clean, corrupt, ii.logit_diff("Mary", "John"))  # doctest: +SKIP
    """
    start = time.perf_counter()
    model = wrap(model)
    warn_if_training(model)
    adapter = adapter_for(model)
    heads = _check_receivers(receivers, receiver_input, adapter)
    a, b = prepare_pair(model, clean, corrupted)
    where = _positions(positions, a.length)
    metric = as_metric(metric)
    bound = OnLogits(model, metric, a.size, a.length)
    clean_z, clean_logits = _record_z(model.module, adapter, {**a.kwargs, **bound.keep})
    bound.settle(clean_logits)  # the clean run, at every position: finds what the metric reads
    corrupt_z, corrupt_logits = _record_z(model.module, adapter, {**b.kwargs, **bound.keep})
    run = _Paths(model.module, adapter, {**a.kwargs, **bound.keep}, a.size, where, clean_z,
                 corrupt_z, bound, heads, receiver_input)
    senders = [(layer, head) for layer in range(adapter.n_layers)
               for head in range(adapter.n_heads)]
    per_prompt = in_chunks(run.chunk, senders, batch_size, "path patching")
    per_prompt = per_prompt.reshape(adapter.n_layers, adapter.n_heads, a.size)
    raw = per_prompt.mean(-1)
    base, floor = float(bound(clean_logits).mean()), float(bound(corrupt_logits).mean())
    target = "logits" if heads is None else (
        f"{receiver_input} of " + ", ".join(f"L{l}H{h}" for l, h in heads))
    return SweepResult(
        normalised(raw, base, floor), raw, per_prompt, base, floor, ("layer", "head"),
        list(range(adapter.n_layers)), where, list(range(adapter.n_heads)),
        token_labels(model, a), f"path -> {target}", "path", "noising", repr(metric),
        time.perf_counter() - start, extra={"receivers": heads or "logits",
                                            "receiver_input": receiver_input,
                                            "metric_positions": bound.reads.describe(),
                                            **metric.no_per_prompt()})


class _Paths:
    """The two forwards of path patching for a chunk of senders."""

    def __init__(self, module: nn.Module, adapter: Adapter, kwargs: dict, n: int,
                 positions: list[int], clean_z: list[torch.Tensor],
                 corrupt_z: list[torch.Tensor], bound: Any, heads: list[Head] | None,
                 receiver_input: str) -> None:
        self.module, self.adapter, self.kwargs, self.n = module, adapter, kwargs, n
        self.pos = torch.tensor(positions)
        self.clean_z, self.corrupt_z, self.bound = clean_z, corrupt_z, bound
        self.heads, self.input = heads, receiver_input

    def chunk(self, senders: list[Head]) -> torch.Tensor:
        """The metric of each (sender, prompt) row: ``[len(senders) * n]``."""
        kwargs = _tiled(self.kwargs, len(senders), self.n)
        with HookSession() as session:
            self._freeze_all_but(session, senders)
            received = self._keep_receiver_inputs(session) if self.heads else None
            logits = self.module(**kwargs).logits
        if received is None:
            return self.bound(logits).float()
        with HookSession() as session:
            self._patch_receivers(session, received)
            return self.bound(self.module(**kwargs).logits).float()

    def _freeze_all_but(self, session: HookSession, senders: list[Head]) -> None:
        for layer in range(self.adapter.n_layers):
            rows = [(i, head) for i, (l, head) in enumerate(senders) if l == layer]
            tap(session, _out_projection(self.module, self.adapter, layer), True,
                self._frozen(layer, len(senders), rows))

    def _frozen(self, layer: int, k: int, rows: list[tuple[int, int]]):
        n, pos, heads = self.n, self.pos.to(self.clean_z[layer].device), self.adapter.n_heads

        def freeze(z: torch.Tensor) -> torch.Tensor:
            new = self.clean_z[layer].repeat(k, 1, 1).to(z.dtype)
            view, source = split_heads(new, heads), split_heads(self.corrupt_z[layer], heads)
            for i, head in rows:  # this row's sender: its output from the corrupted run
                view[i * n:(i + 1) * n, pos, head] = source[:, pos, head].to(z.dtype)
            return new

        return freeze

    def _keep_receiver_inputs(self, session: HookSession) -> dict[int, torch.Tensor]:
        attention.use_sites(session, self.module)
        kept: dict[int, torch.Tensor] = {}
        for layer in {l for l, _ in self.heads}:
            point = site_point(self.module, self.adapter, layer, self.input)
            tap(session, point, False, lambda x, layer=layer: kept.__setitem__(layer, x.clone()))
        return kept

    def _patch_receivers(self, session: HookSession, received: dict[int, torch.Tensor]) -> None:
        attention.use_sites(session, self.module)
        pos = self.pos
        for layer, kept in received.items():
            heads = sorted({h for l, h in self.heads if l == layer})

            def patch(x: torch.Tensor, kept: torch.Tensor = kept, heads: list[int] = heads):
                new = x.clone()
                index = _input_heads(heads, x.shape[1], self.adapter.n_heads)
                for h in index:
                    new[:, h, pos.to(x.device)] = kept[:, h, pos.to(x.device)]
                return new

            point = site_point(self.module, self.adapter, layer, self.input)
            tap(session, point, False, patch)


def _input_heads(heads: list[int], have: int, n_heads: int) -> list[int]:
    """Query heads -> the heads of the patched input (kv heads for k/v under GQA)."""
    return sorted({h * have // n_heads for h in heads})


def _record_z(module: nn.Module, adapter: Adapter,
              kwargs: dict) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Every layer's head outputs (the out-projection's input) and the logits."""
    kept: list[torch.Tensor | None] = [None] * adapter.n_layers
    with HookSession() as session:
        for layer in range(adapter.n_layers):
            tap(session, _out_projection(module, adapter, layer), True,
                lambda z, layer=layer: kept.__setitem__(layer, z.clone()))
        logits = module(**kwargs).logits
    return kept, logits  # type: ignore[return-value]


def _out_projection(module: nn.Module, adapter: Adapter, layer: int) -> nn.Module:
    return get_path(adapter.block(module, layer), adapter.head_proj)


def _tiled(kwargs: dict, times: int, n: int) -> dict:
    """The batch ``times`` over: row ``r`` is prompt ``r % n``."""
    return {k: v.repeat(times, *[1] * (v.dim() - 1))
            if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == n else v
            for k, v in kwargs.items()}


def _positions(positions: Sequence[int] | None, length: int) -> list[int]:
    if positions is None:
        return list(range(length))
    out = []
    for p in positions:
        if not -length <= int(p) < length:
            raise InputError(f"position {p} is outside the prompt ({length} tokens)")
        out.append(int(p) % length)
    return out


def _check_receivers(receivers: Any, receiver_input: str,
                     adapter: Adapter) -> list[Head] | None:
    if isinstance(receivers, str):
        if receivers != "logits":
            raise InputError(f"receivers must be 'logits' or a list of (layer, head); got "
                             f"{receivers!r}")
        return None
    if receiver_input not in ("q", "k", "v"):
        raise InputError(f"receiver_input must be 'q', 'k' or 'v'; got {receiver_input!r}")
    heads = [tuple(map(int, r)) for r in receivers]
    for layer, head in heads:
        if not (0 <= layer < adapter.n_layers and 0 <= head < adapter.n_heads):
            raise InputError(f"receiver (layer {layer}, head {head}) is outside the model "
                             f"({adapter.n_layers} layers, {adapter.n_heads} heads)")
    if not heads:
        raise InputError("receivers is empty: give (layer, head) pairs, or 'logits'")
    return heads  # type: ignore[return-value]
