"""The local replacement model of one prompt: the model with its attention patterns and its
norms' scales frozen at their values on the prompt, and each MLP replaced by a transcoder
plus a constant error (the true MLP output minus the transcoder's). In it, everything between
the feature activations, the error vectors and the token embeddings is linear, so each of
them has an exact direct effect on every later feature's pre-activation and on the logits
(:mod:`ipy_intervene.circuit.attribution_graph`).

>>> rec = record(model.module, adapter, input_ids)                       # doctest: +SKIP
>>> with frozen(model.module, adapter, rec, mlp=lambda layer, x: rec.mlp_out[layer]):
...     model.module(input_ids)                          # doctest: +SKIP  (== the model's)

Hooks only (no weight is changed): the norms' forwards are replaced by their form (read off
and proven by :mod:`ipy_intervene.arch.norms`) with the recorded divisor; the attention patterns come from the recorded forward, through the hook
point of :mod:`ipy_intervene.arch.attention`; each MLP returns what ``mlp(layer, input)`` says.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn

from ipy_intervene.arch import attention
from ipy_intervene.arch.norms import NormForm, norm_form
from ipy_intervene.arch.sites import Adapter, get_path
from ipy_intervene.errors import SiteError
from ipy_intervene.infra.hooks import HookSession, first_tensor, input_key, replace_input

MlpFn = Callable[[int, torch.Tensor], torch.Tensor]


@dataclass
class FrozenNorm:
    """One norm call of the recorded forward: its form (:mod:`ipy_intervene.arch.norms`) and
    its divisor on the prompt ``[1, T, 1]``."""

    form: NormForm
    scale: torch.Tensor


@dataclass
class Recording:
    """What the prompt's forward computed, kept to freeze the model and to build nodes.

    ``emb [T, d]`` the residual stream entering block 0 (the token embeddings, with position
    embeddings where the model adds them); ``mlp_in``/``mlp_out [T, d]`` per layer; the
    patterns ``[1, H, T, T]`` and frozen norms by module; ``logits [V]`` the model's last-
    position logits; ``final [d]`` the unembedding's input there."""

    input_ids: torch.Tensor
    emb: torch.Tensor
    mlp_in: list[torch.Tensor]
    mlp_out: list[torch.Tensor]
    patterns: dict[nn.Module, torch.Tensor] = field(default_factory=dict)
    norms: dict[nn.Module, FrozenNorm] = field(default_factory=dict)
    mlp_rest: dict[int, tuple] = field(default_factory=dict)
    logits: torch.Tensor | None = None
    final: torch.Tensor | None = None


def norm_modules(module: nn.Module, adapter: Adapter) -> list[tuple[str, nn.Module]]:
    """The norms the residual stream passes through outside the MLPs: each block's attention
    and MLP norms (where it has them) and post-attention norm, and the final norm, with their
    paths (a module shared by two roles appears once). A post-MLP norm is part of what a
    transcoder replaces (Gemma Scope's write the post-norm's output)."""
    found: dict[int, tuple[str, nn.Module]] = {}
    mlp_norm = adapter.mlp_norm
    if mlp_norm is None and adapter.mid_norm not in (None, adapter.mlp):
        mlp_norm = adapter.mid_norm
    for layer in range(adapter.n_layers):
        block = adapter.block(module, layer)
        for part in (adapter.attn_norm, mlp_norm, adapter.post_attn_norm):
            if part is not None:
                norm = get_path(block, part)
                found.setdefault(id(norm), (f"{adapter.blocks}[{layer}].{part}", norm))
    final = get_path(module, adapter.final_norm)
    found.setdefault(id(final), (adapter.final_norm, final))
    return list(found.values())


def attention_modules(module: nn.Module, adapter: Adapter) -> list[nn.Module]:
    out = []
    for layer in range(adapter.n_layers):
        attn = get_path(adapter.block(module, layer), adapter.attn)
        if attention.point(attn, "pattern") is None:
            raise SiteError(f"{adapter.name}: {adapter.blocks}[{layer}].{adapter.attn} "
                            f"({type(attn).__name__}) does not go through transformers' "
                            "attention interface, so its pattern cannot be frozen")
        out.append(attn)
    return out


def mlp_module(module: nn.Module, adapter: Adapter, layer: int) -> nn.Module:
    return get_path(adapter.block(module, layer), adapter.mlp)


def mlp_out_module(module: nn.Module, adapter: Adapter, layer: int) -> nn.Module:
    """The module whose output is what the MLP adds (its post-norm where it has one)."""
    return get_path(adapter.block(module, layer), adapter.writer("mlp"))


def wide_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 for float64 values, else float32 (the norms' own upcast)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def unembedded(module: nn.Module, adapter: Adapter, final: torch.Tensor) -> torch.Tensor:
    """The logits before any soft-cap from the unembedding's input ``final [..., d]``: the
    unembedding's output times the family's ``logit_scale`` (linear in ``final``), in
    float64 for float64 models, else float32. What the graph's output nodes read."""
    logits = get_path(module, adapter.unembed)(final)
    logits = logits.to(wide_dtype(logits))
    return logits * adapter.logit_scale if adapter.logit_scale != 1 else logits


def identify_norm(name: str, norm: nn.Module, x: torch.Tensor, y: torch.Tensor) -> FrozenNorm:
    """The form of ``norm`` (:func:`ipy_intervene.arch.norms.norm_form`: read off its
    parameters, proven on its real input ``x`` and output ``y`` to within a few roundings of
    ``y``'s dtype) and the divisor of ``x`` it froze; a SiteError naming ``name`` when no
    known form reproduces the output."""
    rounding = torch.finfo(torch.float32 if y.dtype == torch.float64 else y.dtype).eps
    form = norm_form(norm, x, y, rtol=8 * rounding, name=name)
    wide = torch.float32 if x.device.type == "mps" else torch.float64
    return FrozenNorm(form, form.scale(x.detach().to(wide)))


@torch.no_grad()
def record(module: nn.Module, adapter: Adapter, input_ids: torch.Tensor) -> Recording:
    """One forward of the prompt ``input_ids [1, T]``: patterns, norm scales, MLP inputs and
    outputs, block 0's input and the last-position logits and unembedding input."""
    norms = norm_modules(module, adapter)
    attns = attention_modules(module, adapter)
    n = adapter.n_layers
    rec = Recording(input_ids, None, [None] * n, [None] * n)  # type: ignore[arg-type]
    calls: dict[int, list] = {}
    with HookSession() as session:
        attention.use_sites(session, module)
        for name, norm in norms:
            session.post(norm, _record_norm(rec, name, calls))
        for attn in attns:
            session.post(attention.point(attn, "pattern"), _record_pattern(rec, attn))
        for layer in range(n):
            session.pre(mlp_module(module, adapter, layer), _record_mlp_in(rec, layer))
            session.post(mlp_out_module(module, adapter, layer), _record_mlp(rec, layer))
        session.pre(adapter.block(module, 0), _record_embed(rec))
        session.pre(get_path(module, adapter.unembed), _record_final(rec))
        out = module(input_ids=input_ids)
    rec.logits = first_tensor(out.logits if hasattr(out, "logits") else out)[0, -1].detach()
    missing = [f"MLP {i}" for i, v in enumerate(rec.mlp_out) if v is None]
    missing += [f"attention {i}" for i, a in enumerate(attns) if a not in rec.patterns]
    if missing or rec.emb is None or rec.final is None:
        raise SiteError(f"{adapter.name}: the forward never reached "
                        f"{', '.join(missing) or 'the embedding or unembedding'}")
    rec.mlp_in = _frozen_inputs(module, adapter, rec)
    return rec


def _frozen_inputs(module: nn.Module, adapter: Adapter, rec: Recording) -> list[torch.Tensor]:
    """The MLP inputs of the frozen model at the prompt (each MLP giving its recorded
    output): the model's own up to float rounding (a norm that computes in float32 in a
    float64 model differs by that rounding), and what every feature of the graph reads."""
    inputs: list[Any] = [None] * adapter.n_layers

    def mlp(layer: int, x: torch.Tensor) -> torch.Tensor:
        inputs[layer] = x[0].detach().clone()
        return rec.mlp_out[layer][None].to(x.dtype)

    with frozen(module, adapter, rec, mlp=mlp) as run:
        run(1)
    return inputs


def _record_norm(rec: Recording, name: str, calls: dict) -> Callable:
    def hook(norm: nn.Module, args: tuple, output: Any) -> None:
        if norm in rec.norms:
            raise SiteError(f"{name} ran twice in one forward; the attribution graph freezes "
                            "a norm that runs once per forward")
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor):
            raise SiteError(f"{name}: expected its input as the first positional argument")
        rec.norms[norm] = identify_norm(name, norm, x, first_tensor(output))
    return hook


def _record_pattern(rec: Recording, attn: nn.Module) -> Callable:
    def hook(point: nn.Module, args: tuple, output: torch.Tensor) -> None:
        rec.patterns[attn] = output.detach().clone()
    return hook


def _record_mlp_in(rec: Recording, layer: int) -> Callable:
    def hook(mlp: nn.Module, args: tuple, kwargs: dict) -> None:
        key = input_key(args, kwargs)
        rec.mlp_in[layer] = (args[0] if key == 0 else kwargs[key])[0].detach().clone()
    return hook


def _record_mlp(rec: Recording, layer: int) -> Callable:
    def hook(mlp: nn.Module, args: tuple, output: Any) -> None:
        rec.mlp_out[layer] = first_tensor(output)[0].detach().clone()
        if isinstance(output, (tuple, list)):
            rec.mlp_rest[layer] = tuple(output[1:])
    return hook


def _record_embed(rec: Recording) -> Callable:
    def hook(block: nn.Module, args: tuple, kwargs: dict) -> None:
        key = input_key(args, kwargs)
        rec.emb = (args[0] if key == 0 else kwargs[key])[0].detach().clone()
    return hook


def _record_final(rec: Recording) -> Callable:
    def hook(unembed: nn.Module, args: tuple, kwargs: dict) -> None:
        key = input_key(args, kwargs)
        rec.final = (args[0] if key == 0 else kwargs[key])[0, -1].detach().clone()
    return hook


@contextmanager
def frozen(module: nn.Module, adapter: Adapter, rec: Recording, *, mlp: MlpFn,
           embed: Callable[[torch.Tensor], torch.Tensor] | None = None,
           seen: dict[str, Any] | None = None) -> Iterator[Callable[[int], Any]]:
    """Within the block, ``module``'s forwards run the frozen replacement model: recorded
    patterns and norm scales, each MLP's output ``mlp(layer, its input)``, block 0's input
    ``embed(x)`` (when given). ``seen`` receives ``"final"`` (the unembedding's input).
    Yields ``run(batch)``: the forward of the prompt repeated ``batch`` times."""
    norms, attns = norm_modules(module, adapter), attention_modules(module, adapter)
    with HookSession() as session:
        attention.use_sites(session, module)
        for name, norm in norms:
            if norm not in rec.norms:
                raise SiteError(f"{name} did not run in the recorded forward")
            session.replace_forward(norm, _frozen_forward(rec.norms[norm]))
        for attn in attns:
            pattern = rec.patterns[attn]
            session.post(attention.point(attn, "pattern"), lambda m, a, o, p=pattern: p.to(o.dtype))
        for layer in range(adapter.n_layers):
            replace_mlp(session, module, adapter, layer, mlp, rec.mlp_rest.get(layer))
        if embed is not None:
            session.pre(adapter.block(module, 0), _replace_embed(embed))
        if seen is not None:
            session.pre(get_path(module, adapter.unembed), _keep_final(seen))
        yield lambda batch: _run(module, rec.input_ids, batch)


def _run(module: nn.Module, ids: torch.Tensor, batch: int) -> Any:
    kwargs: dict[str, Any] = {"input_ids": ids.expand(batch, -1)}
    if "logits_to_keep" in inspect.signature(module.forward).parameters:
        kwargs["logits_to_keep"] = 1
    return module(**kwargs)


def _frozen_forward(held: FrozenNorm) -> Callable:
    def make(original: Callable) -> Callable:
        def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            return held.form.frozen(x, held.scale)
        return forward
    return make


def replace_mlp(session: HookSession, module: nn.Module, adapter: Adapter, layer: int,
                 mlp: MlpFn, rest: tuple | None) -> None:
    """The MLP's output (its post-norm's, where it has one) becomes ``mlp(layer, input)``;
    with a post-norm the MLP itself passes its input on (the norm then ignores it)."""
    inner, outer = mlp_module(module, adapter, layer), mlp_out_module(module, adapter, layer)
    if inner is outer:
        session.replace_forward(inner, _mlp_forward(lambda x: mlp(layer, x), rest))
        return
    box: list[torch.Tensor] = []
    session.replace_forward(inner, _mlp_forward(lambda x: box.append(x) or x, None))
    session.replace_forward(outer, _mlp_forward(lambda _: mlp(layer, box.pop()), rest))


def _mlp_forward(fn: Callable[[torch.Tensor], torch.Tensor], rest: tuple | None) -> Callable:
    def make(original: Callable) -> Callable:
        def forward(*args: Any, **kwargs: Any) -> Any:
            key = input_key(args, kwargs)
            out = fn(args[0] if key == 0 else kwargs[key])
            return out if rest is None else (out, *rest)
        return forward
    return make


def _replace_embed(embed: Callable) -> Callable:
    def hook(block: nn.Module, args: tuple, kwargs: dict) -> Any:
        key = input_key(args, kwargs)
        return replace_input(args, kwargs, key, embed(args[0] if key == 0 else kwargs[key]))
    return hook


def _keep_final(seen: dict[str, Any]) -> Callable:
    def hook(unembed: nn.Module, args: tuple, kwargs: dict) -> None:
        key = input_key(args, kwargs)
        seen.setdefault("final", args[0] if key == 0 else kwargs[key])  # the forward's call
    return hook
