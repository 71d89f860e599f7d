"""The batched engine: every grid cell is a block of rows; cells join the run at the layer
they patch ("a staircase"), so nothing a patch cannot change is ever recomputed.

For one prefix length ``p`` (the first position any of the cells patches), the engine runs
blocks on positions ``p..P-1`` only, with the prefix's keys and values from the recorded
corrupted run; a cell patching layer ``l`` joins with the corrupted stream at ``l`` and is
computed from there on. The unembedding runs only at the positions the metric reads.

A model with edits (``ii.edit``) runs each chunk as whole forwards instead, every cell's rows
a copy of the base batch with the cell's writes made by hooks at its layers: an edit may read
or change any module at positions counted from each prompt's start, which a block called on
its own (on the positions from the patched one on) cannot give it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from tqdm.auto import tqdm

from ipy_intervene.arch.sites import Adapter, SiteKind, get_path, split_heads
from ipy_intervene.edits.api import edits
from ipy_intervene.errors import InputError
from ipy_intervene.infra.hooks import site_hooks
from ipy_intervene.infra.progress import progress_disabled
from ipy_intervene.sweep.blocks import BlockCaller, repeat_rows
from ipy_intervene.sweep.record import Recording, forward_logits


@dataclass(frozen=True)
class GridCell:
    """One grid cell: the layers it patches (a window), a position (None: all) and a head."""

    layers: tuple[int, ...]
    pos: int | None
    head: int | None = None


@dataclass
class Edit:
    """Values written at (row, position[, head]) of an activation, in place."""

    rows: torch.Tensor
    pos: torch.Tensor
    head: torch.Tensor | None
    values: torch.Tensor
    n_heads: int

    def __call__(self, x: torch.Tensor) -> None:
        values = self.values.to(x.device, x.dtype)
        rows, pos = self.rows.to(x.device), self.pos.to(x.device)
        if self.head is None:
            x[rows, pos] = values
        else:
            split_heads(x, self.n_heads)[rows, pos, self.head.to(x.device)] = values


@dataclass
class Engine:
    """Everything a sweep's patched runs share: the model, the recordings, the metric."""

    model: Any
    adapter: Adapter
    kind: SiteKind
    base_kwargs: dict[str, Any]
    base: Recording
    source: Recording
    metric: Callable[[torch.Tensor], torch.Tensor]
    positions: list[int]                 # logit positions the metric reads (non-negative)
    budget: int                          # bytes for one chunk's activations
    n_prompts: int
    cells_per_chunk: int | None = None   # overrides the budget
    _callers: dict[int, BlockCaller] = field(default_factory=dict)
    _same: dict[int, torch.Tensor] | None = None   # layer -> where source equals base
    chunking: dict[str, Any] = field(default_factory=dict)  # how the last run was cut

    @property
    def rows(self) -> int:
        return int(self.base_kwargs["input_ids"].shape[0])

    @property
    def length(self) -> int:
        return int(self.base_kwargs["input_ids"].shape[1])

    # -- public --------------------------------------------------------------------------

    @torch.no_grad()
    def run(self, cells: list[GridCell], desc: str = "sweep") -> torch.Tensor:
        """The metric of every row under each cell's patch: ``[len(cells), rows]``."""
        out = torch.empty(len(cells), self.rows, dtype=torch.float32,
                          device=self.base.logits.device)
        chunks = list(self._plan(cells))
        self.chunking = self._describe(chunks)
        bar = tqdm(total=len(cells), desc=desc, delay=1.0, leave=False,
                   disable=progress_disabled())
        try:
            for prefix, index in chunks:
                out[index] = self._run_chunk(prefix, [cells[i] for i in index]).float()
                bar.update(len(index))
        finally:
            bar.close()
        return out

    # -- planning ------------------------------------------------------------------------

    def prefix(self, cell: GridCell) -> int:
        return 0 if cell.pos is None or self.whole_forwards() else cell.pos

    def whole_forwards(self) -> bool:
        """Whether cells run as whole forwards: the model has edits (``ii.edit``), and this
        engine says how to patch a whole forward (an engine that adds a kind of cell without
        defining ``_patch_hooks`` keeps the staircase)."""
        return "_patch_hooks" in vars(type(self)) and bool(edits(self.model))

    def joins_at(self, cell: GridCell) -> int:
        """The stream point where the cell's rows leave the corrupted run."""
        return min(self._point(layer) for layer in cell.layers)

    def _point(self, layer: int) -> int:
        return layer + 1 if self.kind.where == "block_out" else layer

    def _chunks(self, cells: list[GridCell]) -> Iterator[tuple[int, list[int]]]:
        """The chunks a cluster's workers run (``sweep/cluster.py``) on replicas of the
        model built from its weights: without its edits, so an edited model's are refused."""
        names = [e.name for e in edits(self.model)]
        if names:
            raise InputError(
                f"cluster= rebuilds the model on each worker from its class, config and "
                f"weights, without its edits ({', '.join(names)}, made by ii.edit): the "
                "workers would sweep the unedited model. Sweep the edited model without "
                "cluster=")
        return self._plan(cells)

    def _plan(self, cells: list[GridCell]) -> Iterator[tuple[int, list[int]]]:
        by_prefix: dict[int, list[int]] = {}
        for i, cell in enumerate(cells):
            by_prefix.setdefault(self.prefix(cell), []).append(i)
        for prefix, index in sorted(by_prefix.items()):
            index.sort(key=lambda i: self.joins_at(cells[i]))
            size = self.cells_per_chunk or max(
                1, self.budget // (self.rows * self._bytes_per_row(prefix)))
            for start in range(0, len(index), size):
                yield prefix, index[start: start + size]

    def _describe(self, chunks: list[tuple[int, list[int]]]) -> dict[str, Any]:
        """How a run was cut: for ``result.extra["chunking"]`` and the memory benchmark."""
        estimates = [len(index) * self.rows * self._bytes_per_row(prefix)
                     for prefix, index in chunks]
        return {"chunks": len(chunks), "cells_per_chunk": max((len(i) for _, i in chunks),
                                                               default=0),
                "rows_per_cell": self.rows, "budget_mib": round(self.budget / 2**20, 1),
                "estimated_peak_mib": round(max(estimates, default=0) / 2**20, 1),
                "set_by": "batch_size" if self.cells_per_chunk else "memory budget"}

    def _bytes_per_row(self, prefix: int) -> int:
        config = self.model.config
        d = self.base.stream[0].shape[-1]
        width = (getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None)
                 or 4 * d)
        q, n = self.length - prefix, self.length
        elem = self.base.stream[0].element_size()
        activations = q * (8 * d + 3 * width + self.adapter.n_heads * n) + 4 * n * d
        return elem * activations + 4 * len(self.positions) * self.base.logits.shape[-1]

    # -- running -------------------------------------------------------------------------

    def _caller(self, prefix: int) -> BlockCaller:
        caller = self._callers.get(prefix)
        if caller is None:
            caller = BlockCaller(self.model, self.adapter, self.base_kwargs, self.base, prefix)
            self._callers[prefix] = caller
        return caller

    @torch.no_grad()
    def cell_logits(self, cell: GridCell) -> torch.Tensor:
        """Logits ``[rows, positions, vocab]`` at the metric's positions under one cell's patch."""
        return self._patched_logits(self.prefix(cell), [cell])

    def _run_chunk(self, prefix: int, cells: list[GridCell]) -> torch.Tensor:
        return self.metric(self._patched_logits(prefix, cells)).view(len(cells), self.rows)

    def _patched_logits(self, prefix: int, cells: list[GridCell]) -> torch.Tensor:
        """Logits of each cell's block of rows, in the order of ``cells``. A cell that writes
        exactly (bit for bit) the values already there is the base run: its recorded logits."""
        moving = [i for i, cell in enumerate(cells) if not self.untouched(cell)]
        if max(self.positions) < prefix or not moving:  # nothing the metric reads can change
            return self.base.logits.repeat(len(cells), 1, 1)
        order = sorted(moving, key=lambda i: self.joins_at(cells[i]))
        if self.whole_forwards():
            logits = self._whole([cells[i] for i in order])
        else:
            logits = self._staircase(prefix, [cells[i] for i in order])
        if order == list(range(len(cells))):
            return logits
        out = self.base.logits.repeat(len(cells), 1, 1)
        blocks = out.view(len(cells), self.rows, *out.shape[1:])
        blocks[torch.tensor(order, device=out.device)] = logits.view(
            len(order), self.rows, *logits.shape[1:]).to(out.dtype)
        return out

    def untouched(self, cell: GridCell) -> bool:
        """True when the cell's patch writes, in every row, the value already there."""
        if self._same is None:
            self._same = {layer: self._same_bits(layer) for layer in self.source.sites
                          if layer in self.base.sites}
        for layer in cell.layers:
            same = self._same.get(layer)
            if same is None:
                return False
            same = same if cell.pos is None else same[cell.pos]
            same = same if cell.head is None else same[..., cell.head]
            if not bool(same.all()):
                return False
        return True

    def _same_bits(self, layer: int) -> torch.Tensor:
        """``[P]`` (``[P, heads]`` for head sites): source equals base there, in every row."""
        base = self.base.sites[layer]
        source = self.source.sites[layer].to(base.device)
        source = source[torch.arange(base.shape[0], device=base.device) % source.shape[0]]
        if self.kind.per_head:
            base, source = (split_heads(x, self.adapter.n_heads) for x in (base, source))
        equal = _bits(base) == _bits(source.to(base.dtype))
        return equal.flatten(start_dim=3 if self.kind.per_head else 2).all(-1).all(0).cpu()

    def _staircase(self, prefix: int, cells: list[GridCell]) -> torch.Tensor:
        """Run cells sorted by the point where they join: each block of rows joins there."""
        caller, n_layers = self._caller(prefix), self.adapter.n_layers
        joins = [self.joins_at(cell) for cell in cells]
        hidden: torch.Tensor | None = None
        for point in range(n_layers + 1):
            joining = joins.count(point)
            if joining:
                fresh = self.base.stream[point][:, prefix:].repeat(joining, 1, 1)
                hidden = fresh if hidden is None else torch.cat([hidden, fresh.to(hidden.device)])
            edit = self._edit(cells, prefix, point)
            if hidden is None:
                continue
            if edit is not None and self.kind.where in ("block_in", "block_out"):
                edit(hidden)
            if point == n_layers:
                break
            hooks = [] if edit is None or self.kind.where in ("block_in", "block_out") else [
                (self.adapter.module(self.model.module, self.kind.name, point),
                 self.kind.where, edit)]
            with site_hooks(hooks):
                hidden = caller(point, hidden)
        return self._logits(hidden, prefix, len(cells))

    def _whole(self, cells: list[GridCell]) -> torch.Tensor:
        """Logits of each cell's block of rows from one forward of the whole model on copies
        of the base batch: its edits run in every row (each prompt at its own positions),
        then the cells' writes."""
        module, copies = self.model.module, len(cells)
        kwargs = {k: repeat_rows(v, copies) for k, v in self.base_kwargs.items()}
        hooks = self._patch_hooks(cells)
        if self.base.noise is not None:     # causal tracing: the base run's noise again
            noise = repeat_rows(self.base.noise, copies)
            hooks.insert(0, (get_path(module, self.adapter.embed), "module_out",
                             lambda x: x + noise.to(x.device, x.dtype)))
        with site_hooks(hooks):
            return forward_logits(self.model, kwargs, self.positions)

    def _patch_hooks(self, cells: list[GridCell]) -> list[tuple[Any, str, Any]]:
        """One site hook per patched layer, writing every cell's values into a copy of the
        site's value (an edit may hold the tensor it read there)."""
        hooks = []
        for layer in sorted({layer for cell in cells for layer in cell.layers}):
            edit = self._writes(cells, 0, lambda at, layer=layer: at == layer)
            hooks.append((self.adapter.module(self.model.module, self.kind.name, layer),
                          self.kind.where, _copied(edit)))
        return hooks

    def _edit(self, cells: list[GridCell], prefix: int, point: int) -> Edit | None:
        """The writes of all cells at one stream point (or inside one block)."""
        return self._writes(cells, prefix, lambda layer: self._point(layer) == point)

    def _writes(self, cells: list[GridCell], prefix: int,
                at: Callable[[int], bool]) -> Edit | None:
        """The writes of all cells at the layers ``at`` accepts; cell ``i`` owns the ``i``-th
        block of rows."""
        rows, pos, heads, values = [], [], [], []
        prompts = torch.arange(self.rows) % self.n_prompts
        for slot, cell in enumerate(cells):  # sorted by join point: slot = block of rows
            for layer in cell.layers:
                if not at(layer):
                    continue
                positions = range(self.length) if cell.pos is None else [cell.pos]
                for p in positions:
                    rows.append(torch.arange(self.rows) + slot * self.rows)
                    pos.append(torch.full((self.rows,), p - prefix))
                    heads.append(cell.head)
                    values.append(self._source(layer, prompts, p, cell.head))
        if not rows:
            return None
        device = values[0].device
        head = None if heads[0] is None else torch.tensor(
            [h for h, r in zip(heads, rows) for _ in r], device=device)
        return Edit(torch.cat(rows).to(device), torch.cat(pos).to(device), head,
                    torch.cat(values), self.adapter.n_heads)

    def _source(self, layer: int, prompts: torch.Tensor, pos: int,
                head: int | None) -> torch.Tensor:
        value = self.source.sites[layer][prompts.to(self.source.sites[layer].device), pos]
        return value if head is None else split_heads(value, self.adapter.n_heads)[:, head]

    def _logits(self, hidden: torch.Tensor, prefix: int, n_cells: int) -> torch.Tensor:
        module = self.model.module
        kept = [p - prefix for p in self.positions if p >= prefix]
        fresh = self.adapter.logits(module, hidden[:, kept])   # the family's scale and cap too
        if len(kept) == len(self.positions):
            return fresh
        early = self.base.logits[:, [i for i, p in enumerate(self.positions) if p < prefix]]
        return torch.cat([early.repeat(n_cells, 1, 1), fresh], 1)


def _copied(edit: Edit | None) -> Callable[[torch.Tensor], torch.Tensor | None]:
    """A site hook making ``edit``'s writes in a copy of the value it is given."""
    def write(x: torch.Tensor) -> torch.Tensor | None:
        if edit is None:
            return None
        x = x.clone()
        edit(x)
        return x
    return write


def _bits(x: torch.Tensor) -> torch.Tensor:
    """The bit patterns of ``x`` (``0.0`` and ``-0.0`` differ, NaN equals itself)."""
    return x.contiguous().view({1: torch.int8, 2: torch.int16, 4: torch.int32,
                                8: torch.int64}[x.element_size()])
