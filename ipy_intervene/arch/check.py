"""The self-check of a site map: one small forward proves that the sites of an
:class:`~ipy_intervene.arch.sites.Adapter` are what their names say, on this model, before
any analysis reads them.

On a forward of two rows of four tokens (no padding), to float tolerance:

- in every block ``l``, with ``r`` the map's ``residual_multiplier`` and ``attn_out`` /
  ``mlp_out`` the outputs of the post-norms where the map names them (else of ``attn`` /
  ``mlp``): ``resid_pre + r * (attn_out + mlp_out) == resid_post``, and with a ``mid_norm``,
  ``resid_pre + r * attn_out == resid_mid`` (the input of ``mid_norm``) and
  ``resid_mid + r * mlp_out == resid_post``: they are what the block adds to the residual
  stream (an unnamed multiplier or a norm after a sublayer breaks this); a map with a
  ``late_writer`` or a ``block_scale`` (Gemma 4) checks ``s * (resid_mid + mlp_out + late)
  == resid_post``, the model's order of operations;
- ``head_proj``'s output is attention's output (the heads' writes, summed, before any
  post-norm) and its input splits into ``n_heads`` equal heads;
- what the model adds to ``embed_scale`` times the token embeddings (``embed``) before block
  0 does not depend on the tokens (GPT-2's position embeddings pass; an unnamed embedding
  scale does not);
- ``resid_post`` of the last block through ``final_norm``, ``unembed`` and the map's logit
  transform (``logit_scale``, then ``logit_softcap``) is the model's logits;
- no site's tensor is changed in place after its module returns it (Falcon's parallel blocks
  add attention's output into the MLP's): such a site must be in the map's ``refused``.

A map that fails is refused with a :class:`~ipy_intervene.errors.SiteError` naming the family,
the identity, the layer and the largest difference, and the ``ii.Adapter(...)`` line to edit.
A map that passes is remembered for that model object, so the forward runs once per model and
map. The forward runs in its own hook scope (a trace's hooks do not see it), in eval mode,
without autograd, and through ``model.forward`` (hooks on the model's top module do not see it).

>>> import ipy_intervene as ii
>>> from ipy_intervene.arch.sites import adapter_for
>>> model = ii.load_model("demo")
>>> checked(model.module, adapter_for(model)).name
'gpt2'
"""

from __future__ import annotations

import weakref
from dataclasses import MISSING, fields
from typing import Any

import torch
from torch import nn

from ipy_intervene.arch.families import n_heads
from ipy_intervene.errors import SiteError
from ipy_intervene.infra.hooks import entry_point, first_tensor, site_hooks

# `sites` imports this module (adapter_for checks every map), so nothing here imports `sites`:
# an Adapter is any object with its fields, paths are followed by `_get`.
Adapter = Any

ROWS, LENGTH = 2, 4          # the check's forward: two rows of four tokens
SLACK = 16                   # tolerance, in units of the dtype's epsilon, per element

_passed: "weakref.WeakKeyDictionary[nn.Module, set[Any]]" = weakref.WeakKeyDictionary()
_failed: "weakref.WeakKeyDictionary[nn.Module, dict[Any, str]]" = (
    weakref.WeakKeyDictionary())


def checked(module: nn.Module, adapter: Adapter) -> Adapter:
    """``adapter`` if its sites hold on ``module`` (checked once per model and map); else a
    :class:`SiteError` saying what failed."""
    if adapter in _passed.get(module, ()):
        return adapter
    known = _failed.get(module, {}).get(adapter)
    if known is not None:
        raise SiteError(known)
    problem = _problem(module, adapter)
    if problem is None:
        _passed.setdefault(module, set()).add(adapter)
        return adapter
    message = refusal(adapter, problem)
    _failed.setdefault(module, {})[adapter] = message
    raise SiteError(message)


def refusal(adapter: Adapter, problem: str) -> str:
    return (f"the site map of {adapter.name!r} fails its check on this model: {problem}. No "
            "analysis runs on a map whose sites would be wrong. If other modules hold these "
            f"values, pass the map by hand (edit this line): adapter={adapter_line(adapter)}")


def adapter_line(adapter: Adapter) -> str:
    """The ``ii.Adapter(...)`` call that builds ``adapter``."""
    parts = [repr(adapter.name)] + [
        f"{f.name}={getattr(adapter, f.name)!r}" for f in fields(adapter)
        if f.name not in ("name", "n_layers") and not (f.default is not MISSING
                                                         and getattr(adapter, f.name) == f.default)]
    return f"ii.Adapter({', '.join(parts)})"


def _get(root: Any, path: str) -> Any:
    """Follow a dotted attribute path (``sites.get_path``)."""
    for part in path.split("."):
        root = getattr(root, part)
    return root


def _problem(module: nn.Module, adapter: Adapter) -> str | None:
    """What fails on one forward of ``module``, or None."""
    try:
        blocks = _get(module, adapter.blocks)
        n = len(blocks)
        parts = {name: [_get(blocks[l], path) for l in range(n)]
                 for name, path in (("attn", adapter.attn), ("mlp", adapter.mlp),
                                    ("attn_w", adapter.writer("attn")),
                                    ("mlp_w", adapter.writer("mlp")),
                                    ("mid_norm", adapter.mid_norm),
                                    ("late_w", adapter.late_writer),
                                    ("head_proj", adapter.head_proj)) if path is not None}
        scales = [_get(blocks[l], adapter.block_scale) for l in range(n)] \
            if adapter.block_scale is not None else None
        embed = _get(module, adapter.embed)
        final_norm = _get(module, adapter.final_norm)
        unembed = _get(module, adapter.unembed)
    except (AttributeError, IndexError, TypeError) as error:
        return f"a path of the map does not exist ({type(error).__name__}: {error})"
    if n == 0:
        return f"{adapter.blocks} holds no blocks"
    try:
        stated = n_heads(module.config)
    except AttributeError:     # no config, or one that states no head count
        stated = adapter.n_heads
    if stated != adapter.n_heads:
        return (f"n_heads={adapter.n_heads}, but the model's config says {stated} attention "
                "heads (a head sweep would cut the heads at the wrong columns)")
    if scales is not None and not all(isinstance(t, torch.Tensor) and t.numel() in (
            1, t.shape[-1] if t.dim() else 1) for t in scales):
        return f"block_scale={adapter.block_scale!r} is not a scalar tensor in every block"
    seen = _forward(module, adapter, blocks, parts, embed)
    seen["scale"] = scales
    return (_identities(adapter, seen, n) or _in_place(adapter, seen)
            or _readout(adapter, seen, final_norm, unembed)
            or (_parallel(module, adapter, blocks, parts, seen) if adapter.mid_norm is None
                else None))


@entry_point
def _forward(module: nn.Module, adapter: Adapter, blocks: Any, parts: dict[str, list],
             embed: nn.Module) -> dict[str, Any]:
    """One forward of ``ROWS`` x ``LENGTH`` tokens: the values of every site, per layer."""
    seen: dict[str, Any] = {"pre": {}, "post": {}, "attn": {}, "mlp": {}, "mid": {},
                            "late_w": {}, "attn_w": {}, "mlp_w": {}, "heads_in": {},
                            "heads_out": {},
                            "embed": {}, "same": []}

    def keep(name: str, layer: int) -> Any:
        def fn(x: torch.Tensor) -> None:
            seen[name].setdefault(layer, []).append(x.detach().clone())
            seen["same"].append((name, layer, x, seen[name][layer][-1]))
        return fn

    hooks = [(embed, "module_out", keep("embed", 0))]
    for l in range(len(blocks)):
        hooks += [(blocks[l], "block_in", keep("pre", l)),
                  (blocks[l], "block_out", keep("post", l)),
                  (parts["attn"][l], "module_out", keep("attn", l)),
                  (parts["mlp"][l], "module_out", keep("mlp", l)),
                  (parts["attn_w"][l], "module_out", keep("attn_w", l)),
                  (parts["mlp_w"][l], "module_out", keep("mlp_w", l)),
                  (parts["head_proj"][l], "module_in", keep("heads_in", l)),
                  (parts["head_proj"][l], "module_out", keep("heads_out", l))]
        if "mid_norm" in parts:
            hooks.append((parts["mid_norm"][l], "module_in", keep("mid", l)))
        if "late_w" in parts:
            hooks.append((parts["late_w"][l], "module_out", keep("late_w", l)))
    out = _run(module, hooks, _tokens(module, embed))
    logits = getattr(out, "logits", None)
    seen["logits"] = first_tensor(out) if logits is None else logits
    return seen


def _run(module: nn.Module, hooks: list, ids: torch.Tensor) -> Any:
    """``module.forward`` on ``ids`` with ``hooks``, in eval mode, without autograd."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        with torch.no_grad(), site_hooks(hooks):
            return module.forward(input_ids=ids, attention_mask=torch.ones_like(ids),
                                  use_cache=False)
    finally:
        for m, mode in modes:
            m.training = mode


@entry_point
def _parallel(module: nn.Module, adapter: Adapter, blocks: Any, parts: dict[str, list],
              seen: dict) -> str | None:
    """With ``mid_norm=None`` (a parallel residual), the MLP must not read attention's output
    of its own block: a second forward gives each block its first forward's input and
    changes attention's output; each MLP's output must stay as it was."""
    moved: dict[str, Any] = {"mlp": {}}
    gen = torch.Generator().manual_seed(0)

    def restore(l: int) -> Any:
        return lambda x: seen["pre"][l][0]

    def shift(x: torch.Tensor) -> torch.Tensor:
        noise = torch.randn(x.shape, generator=gen, dtype=torch.float32).to(x.device, x.dtype)
        return x + noise * (x.float().std() + 1.0).to(x.dtype)

    def keep(l: int) -> Any:
        return lambda x: moved["mlp"].setdefault(l, []).append(x.detach().clone())

    hooks = []
    for l in range(len(blocks)):
        hooks += [(blocks[l], "block_in", restore(l)), (parts["attn"][l], "module_out", shift),
                  (parts["mlp"][l], "module_out", keep(l))]
    _run(module, hooks, _tokens(module, _get(module, adapter.embed)))
    for l in range(len(blocks)):
        after = _one(moved, "mlp", l, f"mlp_out ({adapter.blocks}[{l}].{adapter.mlp})")
        if isinstance(after, str):
            return after
        diff = _mismatch(after, seen["mlp"][l][0], seen["mlp"][l][0])
        if diff is not None:
            return (f"layer {l}: mid_norm=None says attention and the MLP read the same "
                    f"stream (a parallel residual), but the MLP's output changes with "
                    f"attention's (max difference {diff:.3g}): the block is serial; name the "
                    f"norm before the MLP as mid_norm")
    return None


def _tokens(module: nn.Module, embed: nn.Module) -> torch.Tensor:
    """Two rows of ``LENGTH`` different tokens (no pad token), on the model's input device."""
    weight = getattr(embed, "weight", None)
    vocab = int(weight.shape[0]) if weight is not None else int(module.config.vocab_size)
    pad = getattr(getattr(module, "config", None), "pad_token_id", None)
    usable = [t for t in range(min(vocab, 64)) if t != pad][1:] or [0]
    picks = [usable[(3 + 5 * i) % len(usable)] for i in range(ROWS * LENGTH)]
    return torch.tensor(picks).view(ROWS, LENGTH).to(_device(module, weight))


def _device(module: nn.Module, weight: Any) -> torch.device:
    if isinstance(weight, torch.Tensor) and weight.device.type != "meta":
        return weight.device
    for m in module.modules():       # offloaded by accelerate: where its hooks run the model
        device = getattr(getattr(m, "_hf_hook", None), "execution_device", None)
        if device is not None:
            return torch.device(device if not isinstance(device, int) else f"cuda:{device}")
    return next((p.device for p in module.parameters() if p.device.type != "meta"),
                torch.device("cpu"))


def _one(seen: dict, name: str, layer: int, what: str) -> torch.Tensor | str:
    calls = seen[name].get(layer, [])
    if len(calls) != 1:
        return f"layer {layer}: {what} ran {len(calls)} times in one forward (expected once)"
    return calls[0]


def _mismatch(got: torch.Tensor, want: torch.Tensor, *scale: torch.Tensor) -> float | None:
    """The largest difference when it is above float tolerance (elementwise, relative to the
    magnitudes of the terms), else None."""
    if got.shape != want.shape:
        return float("inf")
    got, scale = got.to(want.device), tuple(t.to(want.device) for t in scale)
    eps = max(torch.finfo(t.dtype).eps if t.is_floating_point() else 0.0
              for t in (got, want, *scale))
    size = sum((t.double().abs() for t in (want, *scale)), torch.zeros((), dtype=torch.float64,
                                                                       device=want.device))
    diff = (got.double() - want.double()).abs()
    floor = eps * float(size.max()) if size.numel() else 0.0
    bad = diff > SLACK * eps * size + floor
    return float(diff.max()) if bool(bad.any()) else None


def _identities(adapter: Adapter, seen: dict, n: int) -> str | None:
    where = lambda path, l: f"{adapter.blocks}[{l}].{path}"  # noqa: E731
    r = adapter.residual_multiplier
    times = "" if r == 1 else f"{r:g} * "
    for l in range(n):
        names = {"pre": "resid_pre (the block's input)", "post": "resid_post (the block's output)",
                 "attn_w": f"attn_out ({where(adapter.writer('attn'), l)})",
                 "mlp_w": f"mlp_out ({where(adapter.writer('mlp'), l)})",
                 "attn": f"attention's output ({where(adapter.attn, l)})",
                 "heads_in": f"head_proj ({where(adapter.head_proj, l)})",
                 "heads_out": f"head_proj ({where(adapter.head_proj, l)})"}
        if adapter.mid_norm is not None:
            names["mid"] = f"resid_mid (the input of {where(adapter.mid_norm, l)})"
        if adapter.late_writer is not None:
            names["late_w"] = f"late_writer's output ({where(adapter.late_writer, l)})"
        values = {}
        for key, what in names.items():
            value = _one(seen, key, l, what)
            if isinstance(value, str):
                return value
            values[key] = value
        pre, post = values["pre"], values["post"]
        attn, mlp = _scaled(values["attn_w"], r), _scaled(values["mlp_w"], r)
        late, scale = _late(adapter, values, seen["scale"], l)
        if "mid" in values:
            mid = values["mid"]
            checks = [(pre + attn, mid, (pre, attn), f"resid_pre + {times}attn_out == resid_mid",
                       "`attn`, `post_attn_norm` or `mid_norm`"),
                      (scale(late(mid + mlp)), post, scale.each(mid, mlp, *late.terms),
                       f"{scale.text}resid_mid + {times}mlp_out{late.text}{scale.end} "
                       "== resid_post", "`mlp`, `post_mlp_norm`, `late_writer` or `block_scale`")]
        else:
            checks = [(scale(late(pre + attn + mlp)), post, scale.each(pre, attn, mlp, *late.terms),
                       f"{scale.text}resid_pre + {times}(attn_out + mlp_out){late.text}"
                       f"{scale.end} == resid_post (the parallel form: mid_norm=None)",
                       "`attn`, `mlp`, `late_writer` or `block_scale`")]
        checks.append((values["heads_out"], values["attn"], (),
                       "head_proj's output == attention's output", "`head_proj`"))
        for got, want, terms, identity, fix in checks:
            diff = _mismatch(got, want, *terms)
            if diff is not None:
                return (f"layer {l}: {identity} does not hold (max difference {diff:.3g}); the "
                        f"modules the map names are not what the block adds to its residual "
                        f"stream (check {fix}; a residual multiplier or a norm after the "
                        f"sublayer the map does not name also does this)")
        width = values["heads_in"].shape[-1]
        if width % adapter.n_heads:
            return (f"layer {l}: the input of head_proj is {width} wide, not a multiple of "
                    f"n_heads={adapter.n_heads}")
    return None


class _Step:
    """One more step of the block's sum (Gemma 4's late writer, its block scale) as the
    model computes it, with its text in the identity; the identity where the map has none."""

    def __init__(self, fn: Any = None, text: str = "", end: str = "",
                 terms: tuple = ()) -> None:
        self.fn, self.text, self.end, self.terms = fn, text, end, terms

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.fn is None else self.fn(x)

    def each(self, *terms: torch.Tensor) -> tuple:
        """The terms of a sum through this step (their sizes set the check's tolerance)."""
        return tuple(self(t) for t in terms)


def _late(adapter: Adapter, values: dict, scales: list | None, l: int) -> tuple[_Step, _Step]:
    """The late writer's add and the block scale of layer ``l`` (steps that do nothing where
    the map names neither)."""
    late, scale = _Step(), _Step()
    if "late_w" in values:
        out = values["late_w"]
        late = _Step(lambda x: x + out, " + late_writer", terms=(out,))
    if scales is not None:
        s = scales[l]
        scale = _Step(lambda x: x * s.to(x.device), f"{adapter.block_scale} * (", ")")
    return late, scale


def _scaled(x: torch.Tensor, r: float) -> torch.Tensor:
    """``x * r`` as the model computes it (a Python float times the tensor); ``x`` for 1."""
    return x if r == 1 else x * r


def _in_place(adapter: Adapter, seen: dict) -> str | None:
    """A site whose tensor changed after its module returned it (and the map does not refuse)."""
    refused = {name for name, _ in adapter.refused}
    sites = {"attn_w": "attn_out", "mlp_w": "mlp_out", "pre": "resid_pre", "post": "resid_post",
             "mid": "resid_mid", "heads_in": "head_out", "embed": "embed",
             "late_w": "late_writer"}
    for key, layer, live, copy in seen["same"]:
        site = sites.get(key)
        if site is None or site in refused or torch.equal(live, copy):
            continue
        return (f"layer {layer}: the tensor of {site} is changed in place after its module "
                f"returns it (by the block, e.g. an in-place add), so a read taken there is "
                f"not the value and a written one would be changed; name it in the map's "
                f"refused=(({site!r}, '<why>'),)")
    return None


def _readout(adapter: Adapter, seen: dict, final_norm: nn.Module,
             unembed: nn.Module) -> str | None:
    embed, start = _one(seen, "embed", 0, f"embed ({adapter.embed})"), seen["pre"][0][0]
    if isinstance(embed, str):
        return embed
    embed = _scaled(embed, adapter.embed_scale)
    added = start - embed
    diff = _mismatch(added[0], added[1], start[0], start[1], embed[0], embed[1])
    if diff is not None:
        scale = "" if adapter.embed_scale == 1 else f"{adapter.embed_scale:g} times "
        return (f"what the model adds to {scale}the token embeddings ({adapter.embed}'s output) "
                f"before block 0 depends on the tokens (max difference {diff:.3g}): the "
                "embeddings are changed on their way in (an embedding scale the map's "
                "embed_scale does not state?), so `embed` is not what block 0 reads")
    last = seen["post"][len(seen["post"]) - 1][0]
    with torch.no_grad():
        logits = adapter.transform_logits(unembed(final_norm(last)))
    model_logits = seen["logits"]
    diff = _mismatch(logits, model_logits) if isinstance(model_logits, torch.Tensor) else None
    if diff is not None:
        return (f"the last block's resid_post through {adapter.final_norm}, {adapter.unembed} "
                f"and the map's logit transform (logit_scale={adapter.logit_scale:g}, "
                f"logit_softcap={adapter.logit_softcap}) is not the model's logits (max "
                f"difference {diff:.3g}; a logit scale or soft-cap the map does not state "
                "also does this)")
    return None
