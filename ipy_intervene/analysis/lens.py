"""Logit lens: the residual stream after each layer, decoded through the family's final norm,
unembedding and logit transform (:meth:`Adapter.logits <ipy_intervene.arch.sites.Adapter.logits>`:
Cohere's logit scale, Granite's logits scaling, Gemma 2/3's final soft-cap), so the lens of the
last layer is the model's own next-token distribution.

>>> import ipy_intervene as ii
>>> model = ii.load_model("demo")
>>> lens = ii.lens(model, "When Mary and John went to the store , John gave a drink to")
>>> lens.top(layer=-1, pos=-1, k=1)[0][0]
'Mary'
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ipy_intervene.analysis.inputs import first_prompt_tokens, numbered
from ipy_intervene.arch.sites import adapter_for
from ipy_intervene.errors import InputError
from ipy_intervene.infra.hooks import entry_point, site_hooks
from ipy_intervene.model.batch import Batch
from ipy_intervene.model.envoys import Model
from ipy_intervene.model.loading import wrap
from ipy_intervene.model.provenance import input_ids_of


@dataclass
class LensResult:
    """Next-token probabilities decoded from every layer: ``probs[layer, pos, vocab]``;
    ``embedding[pos, vocab]``: the stream entering block 0 (the embeddings) decoded the same
    way (None for published streams, which do not include it)."""

    probs: torch.Tensor
    tokens: list[str]                  # a label per position
    layers: list[int]
    decode: Any
    embedding: torch.Tensor | None = None

    def top(self, layer: int | str, pos: int, k: int = 5) -> list[tuple[str, float]]:
        """The ``k`` likeliest tokens read off ``layer`` (an index into ``layers``, or
        ``"embed"``) at ``pos``."""
        if layer == "embed":
            if self.embedding is None:
                raise InputError("this lens has no embedding row (it was made from published "
                                 "streams); ii.lens(model, prompt) has one")
            row = self.embedding[pos]
        else:
            row = self.probs[layer, pos]
        top = row.topk(k)
        return [(self.decode([int(i)]), float(p)) for p, i in zip(top.values, top.indices)]

    def show(self, k: int = 5) -> Any:
        """The lens view: top-1 heatmap with layer/position sliders and a top-k panel."""
        from ipy_intervene.widgets.lens_view import LensView

        return LensView(self, k)

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        return self.show()._repr_mimebundle_(include=include, exclude=exclude)

    def __repr__(self) -> str:
        final = self.top(-1, -1, 1)[0]
        return (f"LensResult({len(self.layers)} layers x {len(self.tokens)} positions; "
                f"last layer, last position: {final[0]!r} {final[1]:.3f})")


@entry_point
def lens(model: Any, source: Any, *, tokens: Any = None, prompt: int = 0) -> LensResult:
    """Logit lens of a prompt (runs one forward), of residual streams a ``%%trace`` cell
    published (a list of tensors ``[batch, pos, d]``, one per layer), or of prompt
    ``prompt`` of an :func:`ii.cache <ipy_intervene.analysis.cache.cache>` holding ``resid_post`` at
    every layer.

    Positions are labelled with their tokens: the prompt's, the tokens of the trace that
    published the streams, or ``tokens=`` (strings, token ids or the prompt text). When the
    tokens cannot be known exactly the labels are ``pos 0``, ``pos 1``, ... (never a guess).

    >>> ii.lens(model, acts)                                           # doctest: +SKIP
    >>> ii.lens(model, [h0, h1], tokens=prompt)                        # doctest: +SKIP
    >>> ii.lens(model, ii.cache(model, prompts), prompt=3)              # doctest: +SKIP
    """
    from ipy_intervene.analysis.cache import ActivationCache

    model = wrap(model)
    adapter = adapter_for(model)
    with torch.no_grad():
        entering = None
        if isinstance(source, ActivationCache):
            streams, labels, entering = _cached_streams(model, adapter, source, prompt)
            prompt = 0
        elif isinstance(source, (list, tuple)) and source and isinstance(source[0], torch.Tensor):
            streams = list(source)
            labels = _stream_labels(model, streams, tokens, prompt)
        else:
            streams, batch, entering = _streams(model, adapter, source)
            labels = numbered(first_prompt_tokens(model, batch))
        probs = torch.stack([_decode(model, adapter, h, prompt) for h in streams])
        embedding = None if entering is None else _decode(model, adapter, entering, prompt)
    if len(labels) != probs.shape[1]:
        raise InputError(f"{len(labels)} token labels for {probs.shape[1]} positions: give "
                         "tokens= for the prompt the streams were computed from")
    decode = model.tokenizer.decode if model.tokenizer is not None else str
    return LensResult(probs, labels, list(range(len(streams))), decode, embedding)


def _stream_labels(model: Model, streams: list[torch.Tensor], tokens: Any,
                   prompt: int) -> list[str]:
    """Labels of published streams' positions: given, known from their trace, or ``pos i``."""
    if tokens is not None:
        if isinstance(tokens, (str, torch.Tensor)) and model.tokenizer is not None:
            return numbered(model.to_str_tokens(tokens))
        return numbered([str(t) for t in tokens])
    known = [input_ids_of(h) for h in streams]
    first = known[0]
    if first is not None and all(ids is first for ids in known) and prompt < first.shape[0] \
            and model.tokenizer is not None:
        return numbered(model.to_str_tokens(first[prompt]))
    return [f"pos {i}" for i in range(streams[0].shape[-2])]


def _cached_streams(model: Model, adapter: Any, cache: Any,
                    prompt: int) -> tuple[list[torch.Tensor], list[str], Any]:
    if not -len(cache) <= prompt < len(cache):
        raise InputError(f"prompt {prompt} is not in this cache of {len(cache)} prompts")
    if cache.positions is not None:
        raise InputError(f"this cache kept positions {cache.positions} only; the lens reads "
                         "every position: ii.cache(model, prompts) without positions=")
    streams = [cache["resid_post", l][prompt][None].to(model.device)
               for l in range(adapter.n_layers)]
    entering = cache["resid_pre", 0][prompt][None].to(model.device) \
        if ("resid_pre", 0) in cache else None
    return streams, numbered(cache.str_tokens(prompt)), entering


def _streams(model: Model, adapter: Any, prompt: Any) -> tuple[list[torch.Tensor], Batch, Any]:
    """Every block's output and block 0's input (the embeddings) of one forward."""
    batch = model.prepare([prompt])
    streams: list[Any] = [None] * (adapter.n_layers + 1)
    hooks = [(adapter.block(model.module, l), "block_out",
              lambda x, l=l: streams.__setitem__(l, x)) for l in range(adapter.n_layers)]
    hooks.append((adapter.block(model.module, 0), "block_in",
                  lambda x: streams.__setitem__(-1, x)))
    with site_hooks(hooks):
        model.module(**batch.kwargs)
    return streams[:-1], batch, streams[-1]


def _decode(model: Model, adapter: Any, hidden: torch.Tensor, prompt: int) -> torch.Tensor:
    if hidden.dim() == 2:
        hidden = hidden[None]
    logits = adapter.logits(model.module, hidden[prompt: prompt + 1])[0]
    return logits.float().softmax(-1).cpu()
