"""``ii.patch_sweep(..., cluster=...)``: a sweep's chunks of grid cells on Ray actors.

The driver records the two runs and plans the chunks exactly as a local sweep does (same
``batch_size``, same chunks, same cell order inside each), so each chunk is the same
computation wherever it runs; the rows come back and fill the grid in its own order. Ray is
imported only when a cluster sweep starts (``pip install 'ipy_intervene[ray]'``).

>>> cluster = ii.RayCluster(workers=4, gpus_per_worker=1)               # doctest: +SKIP
>>> r = ii.patch_sweep(model, clean, corrupt, ii.logit_diff("Mary", "John"),
...                    batch_size=16, cluster=cluster)                  # doctest: +SKIP
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from ipy_intervene.errors import InputError
from ipy_intervene.infra.interrupts import uninterruptible
from ipy_intervene.infra.progress import progress_disabled
from ipy_intervene.sweep import cluster_worker
from ipy_intervene.sweep.staircase import Engine, GridCell

METHODS = ("activation", "noise")


@dataclass
class RayCluster:
    """Where a cluster sweep runs: ``workers`` Ray actors, each with a replica of the model.

    Over the wire, once per sweep (put in Ray's object store once, read by every actor): the
    model's class (by import path), config, tokenizer and every parameter and buffer (CPU
    bytes in the model's own dtype and layout), then the two recorded runs and the metric;
    per chunk: the cells in, their metric rows ``[cells, prompts x samples]`` (float32) out.
    Chunks are planned on the driver with the sweep's ``batch_size`` (None: what fits in the
    driver's memory), as a local sweep plans them. Ray is started with
    ``ray.init(address=address)`` unless it is already initialised. Actors live until
    :meth:`close` (or the end of a ``with`` block) and are reused by the next sweep.
    ``replaced`` counts the actors started because one died.

    - ``gpus_per_worker``: GPUs per actor (fractions share one); > 0 runs the replica on CUDA.
    - ``max_retries``: how many times a chunk whose actor died is re-run on a fresh actor.
    - ``threads``: torch threads of a CPU actor; None (default) is the driver's own count,
      which bit-identical results on CPU need (a CPU matmul's float order depends on it).

    >>> with ii.RayCluster(workers=2, address="auto") as cluster:       # doctest: +SKIP
    ...     r = ii.patch_sweep(model, clean, corrupt, metric, batch_size=8, cluster=cluster)
    """

    workers: int = 2
    gpus_per_worker: float = 0
    cpus_per_worker: float = 1
    address: str | None = None
    max_retries: int = 3
    threads: int | None = None
    replaced: int = field(default=0, init=False)   # actors started after one died
    _actors: list[Any] = field(default_factory=list, init=False, repr=False)
    _remote: Any = field(default=None, init=False, repr=False)
    _after_chunk: Callable[[Any], None] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.workers, int) or isinstance(self.workers, bool) or self.workers < 1:
            raise InputError(f"workers={self.workers!r}: the number of Ray actors, an int >= 1")
        for name in ("gpus_per_worker", "cpus_per_worker"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise InputError(f"{name}={value!r}: a number >= 0")
        for name in ("max_retries", "threads"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < int(name == "threads")):
                raise InputError(f"{name}={value!r}: an int >= {int(name == 'threads')}")

    @property
    def device(self) -> str:
        return "cuda" if self.gpus_per_worker > 0 else "cpu"

    def actors(self) -> list[Any]:
        """The live actor handles (started on the first sweep)."""
        return list(self._actors)

    @uninterruptible
    def close(self) -> None:
        """Kill the actors (the next sweep starts new ones)."""
        ray = _ray()
        while self._actors:
            ray.kill(self._actors.pop())

    def __enter__(self) -> "RayCluster":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _start(self) -> Any:
        ray = _ray()
        if not ray.is_initialized():
            ray.init(address=self.address)
        if self._remote is None:
            self._remote = ray.remote(num_cpus=self.cpus_per_worker, num_gpus=self.gpus_per_worker,
                                      max_restarts=0)(cluster_worker.Worker)
        return self._remote.remote(self.device)


_DEFAULT: list[RayCluster] = []


def as_cluster(cluster: Any, method: str, sites: list[str]) -> RayCluster | None:
    """``cluster=`` of ``patch_sweep`` as a :class:`RayCluster` (None: a local sweep), after
    checking the sweep is one a cluster runs. ``True`` is a shared ``RayCluster()``."""
    if cluster is None or cluster is False:
        return None
    if cluster is True:
        if not _DEFAULT:
            _DEFAULT.append(RayCluster())
        cluster = _DEFAULT[0]
    if not isinstance(cluster, RayCluster):
        raise InputError(f"cluster={cluster!r}: give ii.RayCluster(workers=..., "
                         "gpus_per_worker=...), True (a local Ray, 2 actors) or None")
    from ipy_intervene.sweep.heads import HEAD_SITES

    if method not in METHODS:
        raise InputError(f"cluster sweeps run method={' or '.join(map(repr, METHODS))}; "
                         f"method={method!r} runs without cluster=")
    inside = [s for s in sites if s in HEAD_SITES]
    if inside:
        raise InputError(f"cluster sweeps run the module sites (resid_pre, attn_out, mlp_out, "
                         f"head_out, ...); {inside[0]!r} runs without cluster=")
    return cluster


def run(cluster: RayCluster, engine: Engine, prepared: Any, cells: list[GridCell],
        desc: str = "sweep") -> torch.Tensor:
    """What ``engine.run(cells)`` returns, bit for bit, computed on the cluster's actors.

    >>> rows = run(cluster, patcher.engine(16), prepared_run, grid.cells())  # doctest: +SKIP
    """
    ray = _ray()
    chunks = list(engine._chunks(cells))
    out = torch.empty(len(cells), engine.rows, dtype=torch.float32,
                      device=engine.base.logits.device)
    try:
        refs = (ray.put(cluster_worker.model_payload(engine.model)),
                ray.put(cluster_worker.sweep_payload(
                    engine, prepared, cluster.threads or torch.get_num_threads())))
    except (TypeError, AttributeError, ValueError) as exc:  # pickling: a metric, a tokenizer
        raise InputError(f"the sweep cannot be sent to the cluster ({exc}); a custom metric "
                         "must be picklable (a def, not a closure over a model)") from exc
    bar = tqdm(total=len(cells), desc=desc, delay=1.0, leave=False, disable=progress_disabled())
    try:
        _Schedule(cluster, refs, chunks).run(out, bar, cells)
    finally:
        bar.close()
    return out


class _Schedule:
    """Chunks to actors, two in flight each; a dead actor's chunks go back to the queue."""

    def __init__(self, cluster: RayCluster, refs: tuple[Any, Any],
                 chunks: list[tuple[int, list[int]]]) -> None:
        self.cluster, self.refs, self.chunks = cluster, refs, chunks
        self.todo: deque[int] = deque(range(len(chunks)))
        self.flying: dict[Any, tuple[int, Any]] = {}   # ref -> (chunk, actor)
        self.tries = [0] * len(chunks)

    def run(self, out: torch.Tensor, bar: Any, cells: list[GridCell]) -> None:
        ray = _ray()
        try:
            self._fill_pool()
            while self.todo or self.flying:
                self._submit(cells)
                ready, _ = ray.wait(list(self.flying), num_returns=1, timeout=0.5)
                for ref in ready:
                    self._receive(ref, out, bar)
        except BaseException:
            self._abort()
            raise

    def _fill_pool(self) -> None:
        for actor in self.cluster._actors:  # kept from an earlier sweep
            actor.load.remote(*self.refs)
        while len(self.cluster._actors) < self.cluster.workers:
            self._add_actor()

    def _add_actor(self) -> Any:
        actor = self.cluster._start()
        actor.load.remote(*self.refs)  # an actor runs its calls in order: chunks wait for it
        self.cluster._actors.append(actor)
        return actor

    def _submit(self, cells: list[GridCell]) -> None:
        busy = [actor for _, actor in self.flying.values()]
        for actor in list(self.cluster._actors):
            while self.todo and busy.count(actor) < 2:
                i = self.todo.popleft()
                prefix, index = self.chunks[i]
                ref = actor.run_chunk.remote(prefix, [cells[j] for j in index])
                self.flying[ref] = (i, actor)
                busy.append(actor)

    def _receive(self, ref: Any, out: torch.Tensor, bar: Any) -> None:
        ray = _ray()
        i, actor = self.flying.pop(ref)
        try:
            rows = ray.get(ref)
        except ray.exceptions.RayActorError:
            self._lost(i, actor)
            return
        except ray.exceptions.RayTaskError as exc:  # the chunk raised: raise it here
            raise exc.as_instanceof_cause() from None
        index = self.chunks[i][1]
        out[index] = rows.to(out.device)
        bar.update(len(index))
        if self.cluster._after_chunk is not None:
            self.cluster._after_chunk(actor)

    def _lost(self, i: int, actor: Any) -> None:
        """The actor died: its chunk goes back to the front of the queue, a new actor in."""
        self.tries[i] += 1
        if self.tries[i] > self.cluster.max_retries:
            raise RuntimeError(f"a chunk of the sweep lost its actor {self.tries[i]} times "
                               "(out of memory on the workers? a smaller batch_size helps)")
        self.todo.appendleft(i)
        if actor in self.cluster._actors:
            self.cluster._actors.remove(actor)
            _ray().kill(actor)
            self.cluster.replaced += 1
            self._add_actor()

    @uninterruptible
    def _abort(self) -> None:
        """Ctrl-C or an error: cancel every chunk in flight and kill the actors."""
        ray = _ray()
        for ref in self.flying:
            try:
                ray.cancel(ref)
            except Exception:  # already finished, or its actor is gone
                pass
        self.flying.clear()
        self.cluster.close()


def _ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise InputError("cluster sweeps need Ray: pip install 'ipy_intervene[ray]'") from exc
    return ray
