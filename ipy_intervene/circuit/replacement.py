"""The local replacement model of one prompt: the model with its attention patterns and its
norms' scales frozen at their values on the prompt, and each MLP replaced by a transcoder
plus a constant error (the true MLP output minus the transcoder's). In it, everything between
the feature activations, the error vectors and the token embeddings is linear, so each of
them has an exact direct effect on every later feature's pre-activation and on the logits
(:mod:`ipy_intervene.circuit.attribution_graph`).

>>> rec = record(model.module, adapter, input_ids)                       # doctest: +SKIP
>>> with frozen(model.module, adapter, rec, mlp=lambda layer, x: rec.mlp_out[layer]):
...     model.module(input_ids)                          # doctest: +SKIP  (== the model's)

Hooks only (no weight is changed): the norms' forwards are replaced by the same arithmetic with
the recorded scale; the attention patterns come from the recorded forward, through the hook
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
from ipy_intervene.arch.sites import Adapter, get_path
from ipy_intervene.errors import SiteError
from ipy_intervene.infra.hooks import HookSession, first_tensor, input_key, replace_input

MlpFn = Callable[[int, torch.Tensor], torch.Tensor]
# a norm's arithmetic with its per-position scale frozen: (kind, x, scale, module) -> output
NORM_KINDS = ("layer", "rms", "rms_offset")


@dataclass
class FrozenNorm:
    """One norm call of the recorded forward: its arithmetic and its scale ``[1, T, 1]``."""

    kind: str
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
        for part in (adapter.attn_norm, mlp_norm, getattr(adapter, "post_attn_norm", None)):
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
    post = getattr(adapter, "post_mlp_norm", None)
    return mlp_module(module, adapter, layer) if post is None else \
        get_path(adapter.block(module, layer), post)


def frozen_norm(kind: str, norm: nn.Module, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The norm's output for ``x`` with the per-position ``scale`` held fixed (linear in x).

    ``layer``: ``(x - mean(x)) * scale * weight + bias`` (torch's LayerNorm); ``rms``:
    ``x * scale * weight`` (Llama's RMSNorm); ``rms_offset``: ``x * scale * (1 + weight)``
    (Gemma's)."""
    weight, bias = getattr(norm, "weight", None), getattr(norm, "bias", None)
    wide = wide_dtype(x)
    h = x.to(wide)
    if kind == "layer":
        h = h - h.mean(-1, keepdim=True)
    h = h * scale
    if weight is not None:
        w = weight.to(wide)
        h = h * (1 + w if kind == "rms_offset" else w)
    if bias is not None and kind == "layer":
        h = h + bias.to(wide)
    return h.to(x.dtype)


def wide_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 for float64 values, else float32 (the norms' own upcast)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _scale(kind: str, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    eps = next((getattr(norm, a) for a in ("eps", "variance_epsilon", "epsilon")
                if isinstance(getattr(norm, a, None), float)), None)
    if eps is None:
        raise SiteError(f"{type(norm).__name__}: no `eps` or `variance_epsilon` attribute; "
                        "the attribution graph freezes LayerNorm and RMSNorm scales only")
    h = x.detach().to(wide_dtype(x))
    if kind == "layer":
        h = h - h.mean(-1, keepdim=True)
    return torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)


def identify_norm(name: str, norm: nn.Module, x: torch.Tensor, y: torch.Tensor) -> FrozenNorm:
    """The arithmetic of ``norm`` (which of NORM_KINDS reproduces its output ``y`` on its
    input ``x``), with the scale of ``x``; a norm none reproduces is a SiteError."""
    size = float(y.detach().abs().max()) + 1.0
    tol = 64 * torch.finfo(torch.float32 if y.dtype == torch.float64 else y.dtype).eps * size
    tried = []
    for kind in NORM_KINDS:
        if kind == "layer" and getattr(norm, "bias", None) is None and \
                not isinstance(norm, nn.LayerNorm) and "LayerNorm" not in type(norm).__name__:
            continue
        try:
            scale = _scale(kind, norm, x)
            diff = float((frozen_norm(kind, norm, x.detach(), scale) - y.detach()).abs().max())
        except RuntimeError as exc:
            tried.append(f"{kind}: {exc}")
            continue
        if diff <= tol:
            return FrozenNorm(kind, scale)
        tried.append(f"{kind}: off by {diff:.3g}")
    raise SiteError(f"{name} ({type(norm).__name__}): none of the norm forms the attribution "
                    f"graph can freeze reproduces its output ({'; '.join(tried)}); supported: "
                    "LayerNorm, RMSNorm (weight or 1 + weight)")


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
            session.replace_forward(norm, _frozen_forward(norm, rec.norms[norm]))
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


def _frozen_forward(norm: nn.Module, frozen_scale: FrozenNorm) -> Callable:
    def make(original: Callable) -> Callable:
        def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            return frozen_norm(frozen_scale.kind, norm, x, frozen_scale.scale.to(x.device))
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
