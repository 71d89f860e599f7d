"""The worker side of a cluster sweep: what travels over the wire, and the worker that
rebuilds the model from it and runs chunks of grid cells with the sweep's own engine.

Nothing here imports Ray: :mod:`ipy_intervene.sweep.cluster` wraps :class:`Worker` in
``ray.remote`` when a sweep starts, and ``import ipy_intervene`` never needs Ray.

>>> payload = model_payload(model)                     # doctest: +SKIP
>>> worker = Worker("cpu")                             # doctest: +SKIP
>>> worker.load(payload, sweep_payload(engine, run, threads=2))   # doctest: +SKIP
>>> worker.run_chunk(0, cells[:4])                     # doctest: +SKIP
tensor([[...]])                                        # [cells, rows], as Engine.run's rows
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn

from ipy_intervene.analysis.metrics import Metric
from ipy_intervene.analysis.reads import Reads
from ipy_intervene.arch.sites import Adapter, SiteKind
from ipy_intervene.errors import InputError
from ipy_intervene.model.envoys import Model
from ipy_intervene.sweep.record import Recording
from ipy_intervene.sweep.staircase import Engine, GridCell


@dataclass
class ModelPayload:
    """A model replica: its class (by import path), its config, every parameter and buffer
    (non-persistent ones too) as CPU bytes in their own dtype and layout, the tokenizer and
    the train/eval mode. Tied tensors travel once; ``aliases`` names the others."""

    cls: type
    config: Any
    tensors: dict[str, "Wire"]
    aliases: dict[str, str]
    tokenizer: Any
    training: bool           # the driver's mode (eval, unless the user turned dropout on)


@dataclass
class SweepPayload:
    """What one sweep's chunks share: the two recorded runs (CPU) and the metric, unbound."""

    adapter: Adapter
    kind: SiteKind
    base_kwargs: dict[str, Any]
    base: Recording
    source: Recording
    metric: Metric
    reads: Reads
    positions: list[int]
    n_prompts: int
    threads: int | None      # torch CPU threads (a CPU matmul's float order depends on them)


def model_payload(model: Model) -> ModelPayload:
    """The replica of ``model`` a worker rebuilds (a Hugging Face model: it needs ``.config``)."""
    module = model.module
    if getattr(module, "config", None) is None:
        raise InputError(f"a cluster sweep rebuilds the model on each worker from its class "
                         f"and config; {type(module).__name__} has no `.config` (use a "
                         "Hugging Face model, or sweep without cluster=)")
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    first: dict[int, str] = {}
    for name, tensor in _named_tensors(module):
        if id(tensor) in first:
            aliases[name] = first[id(tensor)]
        else:
            first[id(tensor)] = name
            tensors[name] = tensor.detach()
    return ModelPayload(type(module), module.config, pack(tensors), aliases, model.tokenizer,
                        module.training)


def sweep_payload(engine: Engine, run: Any, threads: int | None) -> SweepPayload:
    """The recorded runs of ``engine`` and the metric of ``run`` (a ``SweepInputs``), on CPU."""
    base_kwargs, base, source = pack([engine.base_kwargs, engine.base, engine.source])
    return SweepPayload(engine.adapter, engine.kind, base_kwargs, base, source, run.metric,
                        run.reads, list(engine.positions), engine.n_prompts, threads)


def build_model(payload: ModelPayload, device: str) -> Model:
    """The replica: the class built from the config (on the meta device, without memory;
    on the CPU if that fails or leaves a tensor behind), then every tensor put in place as
    sent (same dtype, bits and layout), so nothing depends on the initialisation."""
    tensors = unpack(payload.tensors, device)
    for meta in (True, False):
        try:
            with torch.device("meta" if meta else "cpu"):
                module = payload.cls(payload.config)
        except Exception:
            if not meta:
                raise
            continue
        _check_names(module, payload)
        placed: dict[str, Any] = {}
        for name, tensor in [*tensors.items(), *payload.aliases.items()]:
            placed[name] = _place(module, name,
                                  placed[tensor] if isinstance(tensor, str) else tensor)
        if not any(isinstance(v, torch.Tensor) and v.is_meta
                   for m in module.modules() for v in vars(m).values()):
            break
    return Model(module.train(payload.training), payload.tokenizer)


def _check_names(module: nn.Module, payload: ModelPayload) -> None:
    expected = {name for name, _ in _named_tensors(module)}
    sent = set(payload.tensors) | set(payload.aliases)
    if expected != sent:
        raise RuntimeError(f"the rebuilt {payload.cls.__name__} does not have the driver's "
                           f"tensors: missing {sorted(sent - expected)[:5]}, extra "
                           f"{sorted(expected - sent)[:5]} (different library versions?)")


def build_engine(model: Model, sweep: SweepPayload, device: str) -> Engine:
    """The sweep's engine on the replica: the chunks it runs are the driver's, so no memory
    budget is needed here."""
    metric = sweep.reads.feed(sweep.metric.bind(model, sweep.n_prompts))
    base_kwargs, base, source = unpack([sweep.base_kwargs, sweep.base, sweep.source], device)
    return Engine(model, sweep.adapter, sweep.kind, base_kwargs, base, source, metric,
                  sweep.positions, budget=0, n_prompts=sweep.n_prompts)


class Worker:
    """One replica of the model and the engine of the current sweep (a Ray actor's class)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.model: Model | None = None
        self.engine: Engine | None = None
        self.error: BaseException | None = None

    def load(self, model: ModelPayload, sweep: SweepPayload) -> None:
        """Rebuild the model and the sweep's engine; a failure is raised by every chunk."""
        self.model = self.engine = self.error = None
        try:
            if sweep.threads is not None and self.device == "cpu":
                torch.set_num_threads(sweep.threads)
            self.model = build_model(model, self.device)
            self.engine = build_engine(self.model, sweep, self.device)
        except BaseException as exc:  # kept: the chunks queued behind this call raise it
            self.error = exc
            raise

    def run_chunk(self, prefix: int, cells: list[GridCell]) -> torch.Tensor:
        """The metric rows ``[len(cells), rows]`` of one chunk, as ``Engine.run`` computes them."""
        if self.error is not None:
            raise self.error
        if self.engine is None:
            raise RuntimeError("the worker has no sweep loaded")
        with torch.no_grad():
            return self.engine._run_chunk(prefix, cells).float().cpu()

    def hook_count(self) -> int:
        """Hooks left on the replica (0 between chunks: every hook session removes its own)."""
        if self.model is None:
            return 0
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + ("forward" in m.__dict__)
                   for m in self.model.module.modules())


ALIGN = 4096  # bytes: a tensor's address modulo this is kept on the worker (see Wire)


@dataclass
class Wire:
    """A tensor as sent: the bytes of its whole storage (CPU), its dtype, offset, shape and
    strides, and the address of its storage modulo :data:`ALIGN`. The worker's copy has
    all of these the same: kernels pick their float order by layout and alignment (MKL does:
    weights read in place from a safetensors file sit at odd addresses), so a copy laid out
    differently could give other low bits."""

    raw: torch.Tensor
    dtype: torch.dtype
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    shift: int


def pack(value: Any, memo: dict[int, torch.Tensor] | None = None) -> Any:
    """``value`` (tensors in dicts, lists, tuples or a Recording) with each tensor a
    :class:`Wire`; tensors sharing a storage share its bytes (sent once)."""
    memo = {} if memo is None else memo
    if isinstance(value, torch.Tensor):
        storage = value.untyped_storage()
        key = storage.data_ptr()
        if key not in memo:
            memo[key] = torch.empty(0, dtype=torch.uint8, device=value.device).set_(
                storage).cpu()
        return Wire(memo[key], value.dtype, value.storage_offset(), tuple(value.shape),
                    value.stride(), key % ALIGN)
    return _map(value, lambda v: pack(v, memo))


def unpack(value: Any, device: str, memo: dict[int, Any] | None = None) -> Any:
    """The tensors of a :func:`pack` ed ``value`` on ``device``, laid out as on the driver."""
    memo = {} if memo is None else memo
    if isinstance(value, Wire):
        if id(value.raw) not in memo:
            n = value.raw.numel()
            buf = torch.empty(n + ALIGN, dtype=torch.uint8, device=device)
            start = (value.shift - buf.data_ptr()) % ALIGN
            buf[start: start + n].copy_(value.raw)
            memo[id(value.raw)] = (buf.untyped_storage(), start)
        storage, start = memo[id(value.raw)]
        size = torch.empty(0, dtype=value.dtype).element_size()
        if start % size:  # a storage not aligned to its own dtype: never silently shifted
            raise RuntimeError(f"cannot rebuild a {value.dtype} tensor at an address "
                               f"{value.shift} mod {ALIGN} on the worker")
        return torch.empty(0, dtype=value.dtype, device=device).set_(
            storage, start // size + value.offset, value.shape, value.stride)
    return _map(value, lambda v: unpack(v, device, memo))


def _map(value: Any, fn: Any) -> Any:
    if isinstance(value, dict):
        return {k: fn(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(fn(v) for v in value)
    if isinstance(value, Recording):
        return Recording(**{f.name: fn(getattr(value, f.name)) for f in dataclasses.fields(value)})
    return value


def _named_tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from module.named_parameters(remove_duplicate=False)
    yield from module.named_buffers(remove_duplicate=False)


def _place(module: nn.Module, name: str, value: torch.Tensor) -> torch.Tensor:
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name)
    if leaf in owner._parameters:
        if not isinstance(value, nn.Parameter):
            value = nn.Parameter(value, requires_grad=False)
        owner._parameters[leaf] = value
    else:
        owner._buffers[leaf] = value
    return value
