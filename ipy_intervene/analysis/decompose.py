"""Direct logit attribution: the residual stream at one position split into what each part
of the model wrote into it, and each part's share of a logit difference (or of any direction
read after the final norm).

The parts: the token embeddings, what the model adds to them before block 0 (GPT-2: the
position embeddings), each attention head (its output ``z`` times its slice of the
out-projection weight), each out-projection bias, each MLP output. The final norm's scale is
frozen from the real run, so every part's share is linear and the shares, plus the final
norm's bias and the unembedding's bias, add up to the model's own logit difference.

Every part is what the family's block adds (with Granite's multipliers, through Cohere's and
Granite's logit scales: see ``ii.Adapter``). Two cases are stated in the result's ``note``:

- a norm after attention (Gemma 2/3, OLMo 2/3): a head's write is not linear in its ``z``
  (the norm comes after the out-projection), so attention is one part per layer (``attn
  L``, its ``attn_out``) and ``heads`` is NaN;
- a final logit soft-cap (Gemma 2/3: ``tanh(x / c) * c``): not linear, so everything here
  (shares, ``total``, ``actual``) is the logit BEFORE the cap.

>>> import ipy_intervene as ii
>>> model = ii.load_model("demo")
>>> d = ii.decompose(model, "When Mary and John went to the store , John gave a drink to",
...                  ii.logit_diff("Mary", "John"))
>>> abs(d.total - d.actual) < 1e-4
True
>>> d.top(1)[0][0]
'L1H3'
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ipy_intervene.analysis.metrics import LogitDiff, Metric
from ipy_intervene.arch.attention import head_results
from ipy_intervene.arch.norms import NormForm, norm_form
from ipy_intervene.arch.sites import Adapter, adapter_for, get_path, split_heads
from ipy_intervene.errors import InputError, SiteError
from ipy_intervene.infra.hooks import edit_names, entry_point, site_hooks
from ipy_intervene.model.envoys import Model
from ipy_intervene.model.loading import warn_if_training, wrap


@dataclass
class DecomposeResult:
    """Each component's share of ``metric`` at one position; the shares sum to ``total``.

    ``accumulated[i]``: the metric read off the residual stream after the embeddings
    (``i = 0``) and after each block (``i = l + 1``) with the final norm's scale frozen from the
    real run, so ``accumulated[l + 1] - accumulated[l]`` is layer ``l``'s attention plus MLP
    share. ``logit_lens[i]``: the same streams with the final norm recomputed on each (the
    logit lens of the metric). Both end at ``total``.
    """

    components: dict[str, float]        # name -> share, in the order of the forward
    heads: torch.Tensor                 # [layers, heads]
    layers: dict[str, torch.Tensor]     # "attn" (heads + out-projection bias), "mlp": [layers]
    accumulated: torch.Tensor           # [layers + 1], final norm scale frozen
    logit_lens: torch.Tensor            # [layers + 1], final norm recomputed on each stream
    total: float                        # sum of the components
    actual: float                       # the model's own value, read off its logits
    metric: str
    position: int
    token: str
    labels: list[str] = field(default_factory=list)   # of `accumulated`: embed, L0, L1, ...
    note: str = ""                      # what the shares mean on this family, where it differs

    def top(self, k: int = 5) -> list[tuple[str, float]]:
        """The ``k`` components with the largest share by absolute value.

        >>> d.top(2)                                            # doctest: +SKIP
        [('L1H3', 4.760...), ('L1H0', 4.150...)]
        """
        ranked = sorted(self.components.items(), key=lambda item: -abs(item[1]))
        return ranked[:k]

    def figure(self, k: int = 10) -> Any:
        """The plotly figure: heads heatmap, the other components, the accumulated stream."""
        from ipy_intervene.widgets.decompose_view import decompose_figure

        return decompose_figure(self, k)

    def show(self, k: int = 10) -> Any:
        """The view: the figure and the top ``k`` components, as offline HTML."""
        from ipy_intervene.widgets.decompose_view import DecomposeView

        return DecomposeView(self, k)

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        return self.show()._repr_mimebundle_(include=include, exclude=exclude)

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(self.text())

    def text(self, k: int = 5) -> str:
        """A few lines: the metric, the total against the model's value, the top ``k``."""
        width = max((len(name) for name, _ in self.top(k)), default=0)
        rows = [f"  {name:<{width}}  {value:+.4f}" for name, value in self.top(k)]
        return "\n".join([self._headline(), *([self.note] if self.note else []), f"top {k}:",
                          *rows])

    def _headline(self) -> str:
        return (f"DecomposeResult({self.metric} at position {self.position} {self.token!r}: "
                f"total {self.total:+.4f}, model {self.actual:+.4f}; "
                f"{len(self.components)} components)")

    def __repr__(self) -> str:
        return self._headline()


@entry_point
def decompose(model: Any, prompt: Any, readout: Any, *, position: int = -1,
              row: int = 0) -> DecomposeResult:
    """Direct logit attribution of ``readout`` at ``position`` of one prompt (one forward), or
    of prompt ``row`` of an :func:`ii.cache <ipy_intervene.analysis.cache.cache>` (no forward; the cache
    needs the sites ``embed``, ``resid_pre``, ``head_out``, ``mlp_out``, ``resid_post``).

    ``readout``: ``ii.logit_diff("Mary", "John")``, one token (its logit: ``"Mary"`` or an
    id), or a direction ``[d_model]`` read after the final norm.

    >>> d = ii.decompose(model, prompt, ii.logit_diff("Mary", "John"))   # doctest: +SKIP
    >>> d.heads.shape, d.top(3)                                          # doctest: +SKIP
    >>> d = ii.decompose(model, c, ii.logit_diff("Mary", "John"), row=5)  # doctest: +SKIP
    """
    from ipy_intervene.analysis.cache import ActivationCache

    model = wrap(model)
    warn_if_training(model)
    adapter = adapter_for(model)
    adapter.require_summed("decompose")
    with torch.no_grad():
        if isinstance(prompt, ActivationCache):
            ids = prompt.input_ids[row] if -len(prompt) <= row < len(prompt) else None
            if ids is None:
                raise InputError(f"row {row} is not in this cache of {len(prompt)} prompts")
            pos = _position(position, len(ids))
            seen = _from_cache(model, adapter, prompt, row, pos)
        else:
            batch = model.prepare([prompt])
            if batch.size != 1:
                raise InputError(f"decompose reads one prompt; got {batch.size}")
            pos = _position(position, batch.length)
            seen = _capture(model, adapter, batch.kwargs, pos)
            ids = batch.kwargs["input_ids"][0]
        spec = _readout(model, adapter, readout, seen["norm_in"].shape[-1])
        result = _attribute(model, adapter, seen, spec)
    token = model.to_str_tokens(ids[pos:pos + 1])[0] if model.tokenizer is not None \
        else str(int(ids[pos]))
    return DecomposeResult(**result, metric=spec.name, position=pos, token=token,
                           note=_note(adapter))


def _note(adapter: Adapter) -> str:
    notes = []
    if adapter.nonlinear_heads("decompose"):
        notes.append(f"{adapter.name} puts a norm after attention ({adapter.post_attn_norm}): a "
                     "head's write is not linear in its z, so attention is one part per layer "
                     "(attn L) and heads are NaN")
    if adapter.logit_softcap is not None:
        notes.append(f"{adapter.name} soft-caps its logits (tanh(x / {adapter.logit_softcap:g}) "
                     f"* {adapter.logit_softcap:g}), which is not linear: every value here is "
                     "before the cap")
    return "; ".join(notes)


def _from_cache(model: Model, adapter: Adapter, cache: Any, row: int, pos: int) -> dict:
    """What :func:`_capture` reads, from a cache: the final norm and the unembedding run on
    the cached stream (the same modules, the same input)."""
    n = adapter.n_layers
    at = lambda key: cache.at(key, row, pos).to(model.device)  # noqa: E731
    attn = [at(("attn_out", l)) if adapter.post_attn_norm else at(("head_out", l)).flatten()
            for l in range(n)]
    seen: dict[str, Any] = {"embed": at("embed"), "resid_pre": at(("resid_pre", 0)),
                            "attn" if adapter.post_attn_norm else "z": attn,
                            "mlp": [at(("mlp_out", l)) for l in range(n)],
                            "norm_in": at(("resid_post", n - 1))}
    seen["norm_out"] = get_path(model.module, adapter.final_norm)(seen["norm_in"][None])[0]
    seen["logits"] = _before_cap(model, adapter, seen["norm_out"])
    return seen


def _before_cap(model: Model, adapter: Adapter, normed: torch.Tensor) -> torch.Tensor:
    """The logits from the final norm's output, with the logit scale, before any soft-cap."""
    logits = get_path(model.module, adapter.unembed)(normed[None])[0]
    if adapter.logit_scale != 1:
        logits = logits * adapter.logit_scale
    return logits.detach().double().cpu()


def _position(position: int, length: int) -> int:
    if not -length <= position < length:
        raise InputError(f"position {position} is outside the prompt ({length} tokens)")
    return position % length


# -- the readout: a direction after the final norm --------------------------------------


@dataclass
class _Readout:
    name: str
    direction: torch.Tensor             # [d_model], float64
    bias: float | None                  # the unembedding's bias term; None without one
    tokens: list[tuple[int, float]]     # (token id, coefficient); empty for a raw direction


def _readout(model: Model, adapter: Adapter, readout: Any, d_model: int) -> _Readout:
    if isinstance(readout, torch.Tensor):
        if readout.shape != (d_model,):
            raise InputError(f"a direction must have shape [{d_model}] (d_model); got "
                             f"{list(readout.shape)}")
        return _Readout("direction", readout.detach().double().cpu(), None, [])
    if isinstance(readout, LogitDiff):
        (good,), (bad,) = (readout._ids(model, a, 1).tolist() for a in readout.answers)
        tokens = [(good, 1.0), (bad, -1.0)]
        name = f"logit_diff({_word(model, good)!r}, {_word(model, bad)!r})"
    elif isinstance(readout, (str, int)) and not isinstance(readout, bool):
        tid = readout if isinstance(readout, int) else model.token_id(readout)
        tokens, name = [(tid, 1.0)], f"logit({_word(model, tid)!r})"
    else:
        what = readout.name if isinstance(readout, Metric) else type(readout).__name__
        raise InputError(f"decompose needs a readout that is linear in the residual stream: "
                         f"ii.logit_diff(a, b), one token, or a direction tensor "
                         f"[{d_model}]; got {what}")
    unembed = get_path(model.module, adapter.unembed)
    weight, bias = _weights(unembed, "unembedding")
    scale = adapter.logit_scale            # Cohere, Granite: logits scaled after the unembedding
    direction = sum(c * weight[t].double().cpu() for t, c in tokens) * scale
    offset = sum(c * float(bias[t]) for t, c in tokens) * scale if bias is not None else None
    return _Readout(name, direction, offset, tokens)


def _word(model: Model, token: int) -> str:
    return model.tokenizer.decode([token]) if model.tokenizer is not None else str(token)


def _weights(module: nn.Module, what: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    weight, bias = module.weight.detach(), getattr(module, "bias", None)
    if weight.is_meta:
        raise InputError(f"the {what} weights are offloaded (on `meta`); decompose reads "
                         "them directly: load the model without disk/CPU offload")
    return weight, None if bias is None else bias.detach()


# -- one forward: the values at one position ----------------------------------------------


def _capture(model: Model, adapter: Adapter, kwargs: dict, pos: int) -> dict[str, Any]:
    """The token embedding, block 0's input, each head-projection input and MLP output, and
    the final norm's input and output, at ``pos``; and the logits there."""
    root, n = model.module, adapter.n_layers
    seen: dict[str, Any] = {"z": [None] * n, "attn": [None] * n, "mlp": [None] * n}

    def keep(key: str, layer: int | None = None) -> Any:
        def fn(x: torch.Tensor) -> None:
            value = x[0, pos].detach().clone()
            if layer is None:
                seen[key] = value
            else:
                seen[key][layer] = value
        return fn

    hooks = [(get_path(root, adapter.embed), "module_out", keep("embed")),
             (adapter.block(root, 0), "block_in", keep("resid_pre")),
             (get_path(root, adapter.final_norm), "module_in", keep("norm_in")),
             (get_path(root, adapter.final_norm), "module_out", keep("norm_out"))]
    for layer in range(n):
        block = adapter.block(root, layer)
        hooks.append((adapter.module(root, "head_out", layer), "module_in", keep("z", layer)))
        hooks.append((get_path(block, adapter.writer("attn")), "module_out", keep("attn", layer)))
        hooks.append((get_path(block, adapter.writer("mlp")), "module_out", keep("mlp", layer)))
    with site_hooks(hooks):
        out = root(**kwargs)
    logits = getattr(out, "logits", None)
    seen["logits"] = (logits if logits is not None else out[0])[0, pos].detach().double().cpu()
    if adapter.logit_softcap is not None:
        seen["logits"] = _before_cap(model, adapter, seen["norm_out"])
    return seen


# -- the algebra ----------------------------------------------------------------------------


def _parts(model: Model, adapter: Adapter,
           seen: dict[str, Any]) -> tuple[list[str], torch.Tensor, list[int]]:
    """Names, residual vectors ``[n, d_model]`` (float64) and each vector's group: 0 for
    the embeddings, ``l + 1`` for layer ``l``."""
    embed = seen["embed"].double().cpu() * adapter.embed_scale
    names, vectors, groups = ["embed"], [embed], [0]
    extra = seen["resid_pre"].double().cpu() - embed
    if bool(extra.abs().max() > 0):
        names, vectors, groups = names + ["pos embed"], vectors + [extra], groups + [0]
    r = adapter.residual_multiplier                 # Granite: the block adds r * output
    for layer in range(adapter.n_layers):
        if adapter.post_attn_norm is not None:      # not linear in the heads: one part
            names.append(f"attn {layer}")
            vectors.append(seen["attn"][layer].double().cpu() * r)
        else:
            proj = adapter.module(model.module, "head_out", layer)
            heads, bias = _head_vectors(proj, seen["z"][layer], adapter.n_heads)
            names += [f"L{layer}H{h}" for h in range(adapter.n_heads)]
            vectors += list(heads * r)
            if bias is not None:
                names.append(f"attn bias {layer}")
                vectors.append(bias * r)
        names.append(f"mlp {layer}")
        vectors.append(seen["mlp"][layer].double().cpu() * r)
        groups += [layer + 1] * (len(names) - len(groups))
    stack = torch.stack(vectors)
    _check_close(stack.sum(0), seen["norm_in"], model)
    return names, stack, groups


def _head_vectors(proj: nn.Module, z: torch.Tensor,
                  n_heads: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each head's write into the residual stream ``[heads, d_model]`` and the bias."""
    _, bias = _weights(proj, "attention out-projection")
    zs = split_heads(z.to(proj.weight.device, torch.float32), n_heads)
    try:
        heads = head_results(proj, zs[None, None], dtype=torch.float32)[0, 0]
    except SiteError as e:
        raise InputError(f"decompose: {e.detail}") from None
    return heads.detach().double().cpu(), None if bias is None else bias.double().cpu()


def _attribute(model: Model, adapter: Adapter, seen: dict[str, Any],
               spec: _Readout) -> dict[str, Any]:
    names, vectors, groups = _parts(model, adapter, seen)
    stream = seen["norm_in"].double().cpu()
    try:
        norm = norm_form(get_path(model.module, adapter.final_norm), stream, seen["norm_out"])
    except SiteError as e:
        raise InputError(f"decompose: {e.detail}") from None
    scale = norm.scale(stream)
    shares = norm.linear(vectors, scale) @ spec.direction
    components = dict(zip(names, shares.tolist()))
    if norm.bias is not None:
        components["final norm bias"] = float(norm.bias @ spec.direction)
    if spec.bias is not None:
        components["unembed bias"] = spec.bias
    constant = components.get("final norm bias", 0.0) + components.get("unembed bias", 0.0)
    return dict(components=components, **_per_layer(adapter, names, shares, groups),
                **_accumulated(vectors, shares, groups, norm, spec, constant),
                total=float(sum(components.values())), actual=_actual(seen, spec))


def _per_layer(adapter: Adapter, names: list[str], shares: torch.Tensor,
               groups: list[int]) -> dict[str, Any]:
    n, h, f32 = adapter.n_layers, adapter.n_heads, torch.float32
    heads, attn, mlp = torch.zeros(n, h, dtype=f32), torch.zeros(n, dtype=f32), torch.zeros(n, dtype=f32)
    if adapter.post_attn_norm is not None:
        heads.fill_(float("nan"))                   # not linear in the heads (see _note)
    for name, share, group in zip(names, shares.tolist(), groups):
        if group == 0:
            continue
        if name.startswith("mlp"):
            mlp[group - 1] = share
            continue
        attn[group - 1] += share
        if name.startswith("L"):
            heads[group - 1, int(name.split("H")[1])] = share
    return dict(heads=heads, layers={"attn": attn, "mlp": mlp})


def _accumulated(vectors: torch.Tensor, shares: torch.Tensor, groups: list[int], norm: NormForm,
                 spec: _Readout, constant: float) -> dict[str, Any]:
    index = torch.tensor(groups)
    n = int(index.max()) + 1
    summed = torch.zeros(n, vectors.shape[1], dtype=vectors.dtype).index_add_(0, index, vectors)
    streams = summed.cumsum(0)                                  # after embed, L0, L1, ...
    frozen = torch.zeros(n, dtype=shares.dtype).index_add_(0, index, shares).cumsum(0)
    bias = norm.bias if norm.bias is not None else 0.0
    lens = (norm.linear(streams, norm.scale(streams)) + bias) @ spec.direction + (spec.bias or 0.0)
    return dict(accumulated=(frozen + constant).float(), logit_lens=lens.float(),
                labels=["embed"] + [f"L{l}" for l in range(n - 1)])


def _actual(seen: dict[str, Any], spec: _Readout) -> float:
    return float(sum(c * seen["logits"][t] for t, c in spec.tokens)) if spec.tokens else \
        float(seen["norm_out"].double().cpu() @ spec.direction)


def _check_close(mine: torch.Tensor, real: torch.Tensor, model: Model) -> None:
    tol = 1e-3 if real.dtype in (torch.float32, torch.float64) else 5e-2
    real = real.double().cpu()
    gap, size = float((mine - real).norm()), float(real.norm())
    if gap <= tol * size + 1e-5:
        return
    edits = edit_names(model.module)
    why = (f"the edits {edits} (ii.edit) write to it what no component wrote: decompose the "
           "model they were made from" if edits else "this architecture adds something else "
           "to the stream (a norm after attention or the MLP?)")
    raise InputError(f"the components do not add up to the residual stream at the final norm: "
                     f"{why} (relative difference {gap / max(size, 1e-12):.2g}, allowed {tol:g})")
