"""Validate a compiled cell against the model's module tree before anything runs.

- unknown module paths get a "did you mean";
- an index past the number of layers names the count;
- a site used after a later site in straight-line code of one invoke is reported with
  both lines (one forward cannot go back; two cells can).

It also says which modules the run must hook (:class:`HookPlan`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ipy_intervene.arch import attention, moe
from ipy_intervene.compiler.compile import CompiledCell, Part
from ipy_intervene.compiler.graph import InterventionGraph, Site
from ipy_intervene.errors import InterventionError, SiteError
from ipy_intervene.model.envoys import Envoy, Model

INPUT_ATTRS = ("input", "inputs", "skip")


@dataclass
class HookPlan:
    """Modules to hook before the forward: ``pre`` for inputs and skips, ``out`` for outputs."""

    pre: dict[int, nn.Module] = field(default_factory=dict)
    out: dict[int, nn.Module] = field(default_factory=dict)
    skip: dict[int, nn.Module] = field(default_factory=dict)

    def uses_moe_sites(self) -> bool:
        """Whether the cell uses a router or expert site of an MoE block."""
        return any(isinstance(m, moe.MoePoint)
                   for table in (self.pre, self.out) for m in table.values())

    def uses_attention_sites(self) -> bool:
        """Whether the cell uses q, k, v, pattern or z of an attention module."""
        return any(isinstance(m, attention.HookPoint)
                   for table in (self.pre, self.out) for m in table.values())

    def add(self, envoy: Envoy, attr: str) -> None:
        table = self.pre if attr in INPUT_ATTRS else self.out
        table[id(envoy.module)] = envoy.module
        if attr == "skip":
            self.skip[id(envoy.module)] = envoy.module
            self.out[id(envoy.module)] = envoy.module


def validate(cell: CompiledCell, model: Model, graph: InterventionGraph | None = None) -> HookPlan:
    """Check every site of ``cell`` against ``model``; returns the modules to hook.

    Calls on things that are not modules (``model.tokenizer.decode(...)``) are marked
    ``access="plain"`` in ``graph`` (the run's copy of the cell's graph).
    """
    plan = HookPlan()
    graph = graph if graph is not None else cell.graph
    for site in graph.sites:
        if site.attr == "model_output":
            continue
        parts = cell.site_parts[site.id]
        try:
            envoys = envoys_at(model, parts, is_call=site.attr == "call")
        except InterventionError as exc:
            raise exc.at_line(site.line) from None
        if site.attr == "call" and not envoys:
            site.access = "plain"
        if site.attr in ("output", "input", "inputs", "skip"):
            for envoy in envoys:
                check_called(envoy, site.attr, site.line)
                plan.add(envoy, site.attr)
    check_order(cell)
    return plan


def check_called(envoy: Envoy, attr: str, line: int | None = None) -> None:
    """A ModuleList or ModuleDict is never called: it has no input or output of its own."""
    module = envoy.module
    if isinstance(module, (nn.ModuleList, nn.ModuleDict)):
        first = f"[{next(iter(module.keys()))!r}]" if isinstance(module, nn.ModuleDict) else "[0]"
        raise SiteError(
            f"model.{envoy.path} is a {type(module).__name__}, which the model never calls (it "
            f"calls each of its {len(module)} modules), so it has no .{attr}. Index it: "
            f"`model.{envoy.path}{first}.{attr}`, or loop: "
            f"`for layer in model.{envoy.path}: layer.{attr}`", line=line)


def envoys_at(model: Model, parts: tuple[Part, ...], *, is_call: bool = False) -> list[Envoy]:
    """The envoys a path can name: one for a constant path, every layer for ``h[l]``.

    For a call on something that is not a module (``model.tokenizer.decode(...)``),
    returns [] instead of raising.
    """
    envoys: list[Envoy] = [model]
    for kind, value in parts:
        nxt: list[Envoy] = []
        for envoy in envoys:
            if kind == "attr":
                if (value not in envoy.module._modules
                        and attention.point(envoy.module, value) is None
                        and moe.point(envoy.module, value) is None):
                    if is_call:
                        return []
                    if hasattr(envoy.module, value):
                        raise SiteError(f"model.{envoy.path + '.' if envoy.path else ''}"
                                        f"{value} is not a module, so it has no sites")
                    raise SiteError(envoy._missing(value))
                nxt.append(getattr(envoy, value))
            elif kind == "sym":
                nxt.extend(_all_children(envoy))
            else:
                nxt.append(envoy[value])
        envoys = nxt
    return envoys


def _all_children(envoy: Envoy) -> list[Envoy]:
    module = envoy.module
    if isinstance(module, nn.ModuleDict):
        return [envoy[k] for k in module.keys()]
    if isinstance(module, (nn.ModuleList, nn.Sequential)):
        return list(envoy)
    raise SiteError(f"model.{envoy.path} ({type(module).__name__}) cannot be indexed; only "
                    f"ModuleList, Sequential and ModuleDict can")


def check_order(cell: CompiledCell) -> None:
    """Straight-line sites of one invoke must come in the order the forward runs them."""
    graph = cell.graph
    for invoke, region in enumerate(graph.invokes):
        sites = [s for s in graph.sites if s.invoke == invoke and s.region == region
                 and not s.symbolic and s.attr in ("output", "input", "inputs", "skip")]
        sites.sort(key=lambda s: s.line)
        for i, earlier in enumerate(sites):
            for later in sites[i + 1:]:
                if later.line > earlier.line and runs_after(cell.site_parts[earlier.id],
                                                            earlier.attr,
                                                            cell.site_parts[later.id], later.attr):
                    raise _order_error(earlier, later)


def _order_error(earlier: Site, later: Site) -> SiteError:
    return SiteError(
        f"`{later.label}` runs before `{earlier.label}` (line {earlier.line}) in the forward, "
        f"so it has already passed when this line asks for it: one forward cannot go back. "
        f"Use the sites in the order the model runs them, or split the work over two cells: "
        f"one trace that gets the later value, then a second trace that uses it (or "
        f"ii.cache(...) first, then the trace)", line=later.line)


def _index(part: Part) -> int | None:
    return part[1] if part[0] == "index" and isinstance(part[1], int) and part[1] >= 0 else None


def runs_after(a: tuple[Part, ...], a_attr: str, b: tuple[Part, ...], b_attr: str) -> bool:
    """True when site ``a`` certainly happens after site ``b`` in one forward."""
    k = 0
    while k < len(a) and k < len(b) and a[k] == b[k]:
        k += 1
    if k < len(a) and k < len(b):
        ia, ib = _index(a[k]), _index(b[k])
        return ia is not None and ib is not None and ia > ib
    if len(a) == len(b):
        return a_attr == "output" and b_attr in INPUT_ATTRS
    if len(a) > len(b):           # a is inside b: after b's input, before b's output
        return b_attr in INPUT_ATTRS
    return a_attr == "output"     # b is inside a: a's output comes after all of b
