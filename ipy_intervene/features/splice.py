"""A dictionary (SAE, transcoder, direction, subspace...) spliced into a model at a module's
output, so that its latents are a site like any other.

>>> import ipy_intervene as ii
>>> model = ii.load_model("demo")
>>> splice = ii.attach(model, model.transformer.h[2], ii.load_sae("demo"))   # doctest: +SKIP
>>> ii.trace(model, "lat = model.transformer.h[2].sae.latents.output\\n"
...          "model.transformer.h[2].sae.latents.output[:, -1, 5] = 0", prompt)  # doctest: +SKIP
>>> ii.detach(model)                                                          # doctest: +SKIP

The arithmetic (the sweeps use exactly this, so a sweep equals a trace and a plain-hooks
oracle): ``x`` is the target's output (the first element of a tuple); for ``kind="output"``
the latents are ``lat = encode(x)``, for ``kind="transcoder"`` ``lat = encode(input)``;
``error = x - decode(lat)`` under ``torch.no_grad()`` (detached, as SAELens does it);
``lat2 = latents(lat)`` and ``err2 = error(error)`` are the hook points. With grad off and
neither edited (same object, same ``_version``) the output is ``x`` itself, bit for bit;
otherwise it is ``decode(lat2) + err2``, and under grad always that, so gradients reach the
latents through the decoder and not around them.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from ipy_intervene.errors import InputError, InterventionError, SiteError
from ipy_intervene.infra import active
from ipy_intervene.infra.hooks import first_tensor, input_key

KINDS = ("output", "transcoder")


class Latents(nn.Module):
    """A hook point (returns its input): in a trace its ``.output`` is the value, readable
    and writable."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class Splice(nn.Module):
    """``dictionary`` spliced at the output of the module at ``target_path``.

    Children: ``dictionary``, ``latents`` (hook point of the latents ``[..., d_latent]``) and
    ``error`` (hook point of the reconstruction error ``[..., d_model]``; set it to zero to
    drop the error term). Calling it with the target's output (and, for a transcoder, its
    input) gives the spliced output.
    """

    def __init__(self, dictionary: nn.Module, target_path: str, kind: str = "output") -> None:
        super().__init__()
        if kind not in KINDS:
            raise InputError(f"kind={kind!r}: expected one of {', '.join(map(repr, KINDS))}")
        for method in ("encode", "decode"):
            if not callable(getattr(dictionary, method, None)):
                raise InputError(f"the dictionary ({type(dictionary).__name__}) has no "
                                 f"`{method}` method; a dictionary needs encode(x) -> latents "
                                 "and decode(latents) -> x_hat")
        self.dictionary = dictionary
        self.latents = Latents()
        self.error = Latents()
        self.target_path = target_path
        self.kind = kind
        self._handle: Any = None

    def extra_repr(self) -> str:
        return f"at={self.target_path!r}, kind={self.kind!r}"

    def forward(self, x: torch.Tensor, source: torch.Tensor | None = None) -> torch.Tensor:
        """The spliced output for the target's output ``x`` (``source``: what is encoded,
        the target's input for a transcoder; ``x`` itself when None)."""
        src = x if source is None else source
        if not isinstance(x, torch.Tensor) or not isinstance(src, torch.Tensor):
            got = type(x if not isinstance(x, torch.Tensor) else src).__name__
            raise SiteError(f"the splice at {self.target_path} needs a tensor (or a tuple "
                            f"whose first element is one) as the module's "
                            f"{'input' if source is not None else 'output'}; got {got}")
        dtype = dictionary_dtype(self.dictionary, x)
        lat = self._encode(src.to(dtype))
        with torch.no_grad():
            err = x.to(dtype) - self.dictionary.decode(lat)
        if lat.requires_grad:  # an in-place edit must not touch what encode saved for backward
            lat = lat.clone()
        versions = _versions(lat, err)
        lat2 = self.latents(lat)
        err2 = self.error(err)
        edited = lat2 is not lat or err2 is not err or versions is None or \
            versions != _versions(lat, err)
        if not edited and not torch.is_grad_enabled():
            return x
        return (self.dictionary.decode(lat2) + err2).to(x.dtype)

    def _encode(self, src: torch.Tensor) -> torch.Tensor:
        try:
            return self.dictionary.encode(src)
        except (RuntimeError, InterventionError) as exc:
            width = _width(self.dictionary)
            want = f"; it reads vectors of width {width}" if width is not None else ""
            why = exc.detail if isinstance(exc, InterventionError) else str(exc)
            raise SiteError(f"the dictionary spliced at {self.target_path} could not encode "
                            f"the {'input' if self.kind == 'transcoder' else 'output'} of "
                            f"shape {list(src.shape)}{want} ({why})") from None


def attach(model: Any, at: Any, dictionary: nn.Module, *, name: str = "sae",
           kind: str = "output") -> Splice:
    """Splice ``dictionary`` at the module ``at`` (an envoy or its path): it becomes the child
    ``name`` of that module, and one forward hook routes the module's output through it.

    >>> splice = ii.attach(model, model.transformer.h[2], sae)          # doctest: +SKIP
    >>> splice.target_path, splice.kind
    ('transformer.h[2]', 'output')
    """
    _not_in_a_trace("ii.attach")
    root = _root(model)
    path = at.path if hasattr(at, "path") and hasattr(at, "module") else at
    if not isinstance(path, str):
        raise InputError(f"`at` is a module of the model (model.transformer.h[2]) or its path "
                         f"('transformer.h[2]'); got {type(at).__name__}")
    target = module_at(root, path)
    path = next((_envoy_path(root, n) for n, m in root.named_modules() if m is target), path)
    if name in target._modules or hasattr(type(target), name):
        raise SiteError(f"model.{path} already has a child or attribute `{name}`; detach it "
                        f"first (ii.detach(model, model.{path})) or pass another name=")
    if any(isinstance(m, Splice) for m in target.modules()):
        raise SiteError(f"model.{path} already holds a splice; ii.detach(model, model.{path}) "
                        "first")
    splice = Splice(dictionary, path, kind)
    param = next(target.parameters(), None)
    if param is not None and param.device.type != "meta":
        splice.dictionary.to(param.device)
    target.add_module(name, splice)
    splice._handle = target.register_forward_hook(_route(splice), with_kwargs=True)
    return splice


def detach(model: Any, at: Any = None) -> None:
    """Remove the splices (all, or the one at ``at``): no hook and no child is left.

    >>> ii.detach(model)                                                 # doctest: +SKIP
    """
    _not_in_a_trace("ii.detach")
    path = None if at is None else (at.path if hasattr(at, "module") else at)
    if path is not None:
        target = module_at(_root(model), path)
        path = next((s.target_path for s in attached(model).values()
                     if module_at(_root(model), s.target_path) is target), path)
    spliced = attached(model)
    if path is not None and not any(s.target_path == path for s in spliced.values()):
        where = ", ".join(s.target_path for s in spliced.values()) or "none"
        raise SiteError(f"no splice at model.{path}; splices are at: {where}")
    root = _root(model)
    for splice in spliced.values():
        if path is not None and splice.target_path != path:
            continue
        parent = module_at(root, splice.target_path)
        child = next(n for n, m in parent._modules.items() if m is splice)
        if splice._handle is not None:
            splice._handle.remove()
            splice._handle = None
        delattr(parent, child)


def attached(model: Any) -> dict[str, Splice]:
    """The splices in the model, by envoy path.

    >>> ii.attached(model)                                               # doctest: +SKIP
    {'transformer.h[2].sae': Splice(at='transformer.h[2]', kind='output' ...)}
    """
    return {_envoy_path(_root(model), n): m for n, m in _root(model).named_modules()
            if isinstance(m, Splice)}


def _envoy_path(root: nn.Module, dotted: str) -> str:
    """``"transformer.h.2.sae"`` (named_modules) as the cell spells it: ``"transformer.h[2].sae"``."""
    path, module = "", root
    for part in dotted.split(".") if dotted else []:
        if isinstance(module, (nn.ModuleList, nn.Sequential)) and part.isdigit():
            path += f"[{part}]"
        elif isinstance(module, nn.ModuleDict):
            path += f"[{part!r}]"
        else:
            path += f".{part}" if path else part
        module = module._modules[part]
    return path


def module_at(root: nn.Module, path: str) -> nn.Module:
    """The module at an envoy path (``"transformer.h[2].mlp"``) under ``root``."""
    module = root
    for part in _parts(path):
        try:
            module = module[part] if isinstance(part, int) else getattr(module, part)
        except (AttributeError, IndexError, KeyError, TypeError):
            raise SiteError(f"model.{path}: no module at {part!r} (under "
                            f"{type(module).__name__})") from None
        if not isinstance(module, nn.Module):
            raise SiteError(f"model.{path} is not a module ({type(module).__name__})")
    return module


def _parts(path: str) -> list[str | int]:
    parts: list[str | int] = []
    for name, index, key in re.findall(r"([A-Za-z_]\w*)|\[(-?\d+)\]|\[['\"]([^'\"]+)['\"]\]",
                                       path):
        parts.append(name or (int(index) if index else key))
    if not parts and path:
        raise SiteError(f"{path!r} is not a module path like 'transformer.h[2].mlp'")
    return parts


def _route(splice: Splice):
    def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        x = first_tensor(output)
        source = None
        if splice.kind == "transcoder":
            key = input_key(args, kwargs)
            source = args[0] if key == 0 else kwargs[key]
        new = splice(x, source)
        if new is x:
            return None
        if isinstance(output, tuple):
            return (new, *output[1:])
        if isinstance(output, list):
            return [new, *output[1:]]
        return new

    hook.keep_in_dry_run = True  # part of the model, not an observer: a dry run should run it
    return hook


def _root(model: Any) -> nn.Module:
    module = getattr(model, "module", model)
    if not isinstance(module, nn.Module):
        raise InputError(f"expected an ii.Model or a torch.nn.Module; got {type(model).__name__}")
    return module


def _not_in_a_trace(what: str) -> None:
    if active.current_trace() is not None:
        raise SiteError(f"{what} changes the model's module tree; call it between cells, not "
                        "inside a running trace")


def _versions(*tensors: torch.Tensor) -> tuple[int, ...] | None:
    """In-place edit counters (None for inference-mode tensors, which have none: then the
    splice always decodes, which is right whether or not they were edited)."""
    try:
        return tuple(t._version for t in tensors)
    except RuntimeError:
        return None


def dictionary_dtype(dictionary: nn.Module, x: torch.Tensor) -> torch.dtype:
    """The dictionary's float dtype (its first float parameter or buffer), else ``x``'s."""
    for tensor in (*dictionary.parameters(), *dictionary.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype
    return x.dtype


def _width(dictionary: nn.Module) -> int | None:
    for attr in ("d_in", "d_model"):
        value = getattr(dictionary, attr, None)
        if isinstance(value, int):
            return value
    return None
