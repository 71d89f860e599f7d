"""Attention patterns: every head's softmax probabilities, query by key, read in one forward
with the model's own eager attention (exact whatever implementation the model was loaded
with: eager, SDPA, flash), or taken from tensors a ``%%trace`` cell published.

>>> import ipy_intervene as ii
>>> model = ii.load_model("demo")
>>> p = attention_patterns(model, "When Mary and John went to the store , John gave a drink to")
>>> p.patterns.shape[-2:] == (len(p.tokens), len(p.tokens))
True
>>> round(float(p.patterns[0, 0, 3].sum()), 4)       # a query row sums to 1
1.0
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ipy_intervene.analysis.inputs import numbered
from ipy_intervene.arch.sites import adapter_for
from ipy_intervene.errors import InputError
from ipy_intervene.infra.hooks import entry_point
from ipy_intervene.model.batch import encode_id_list
from ipy_intervene.model.envoys import Model
from ipy_intervene.model.loading import warn_if_training, wrap
from ipy_intervene.model.provenance import input_ids_of

ROW_SUM_TOL = {torch.float32: 1e-4, torch.float64: 1e-8}   # other dtypes: 2e-2


@dataclass
class PatternResult:
    """Attention patterns of one prompt: ``patterns[i, head, query, key]`` is layer
    ``layers[i]``'s softmax probability from the query position to the key position
    (float32, CPU). ``tokens`` labels the key positions; the query positions are the last
    ``patterns.shape[-2]`` of them (all of them, except for a generation step's patterns)."""

    patterns: torch.Tensor
    tokens: list[str]
    layers: list[int]

    @property
    def n_heads(self) -> int:
        return self.patterns.shape[1]

    @property
    def query_tokens(self) -> list[str]:
        return self.tokens[len(self.tokens) - self.patterns.shape[2]:]

    def layer_index(self, layer: int) -> int:
        """The index into ``patterns`` of model layer ``layer`` (negative: from the end of
        ``layers``); an error naming the layers there are."""
        if not isinstance(layer, int) or isinstance(layer, bool):
            raise InputError(f"layer must be an int; got {layer!r}")
        if layer in self.layers:
            return self.layers.index(layer)
        if -len(self.layers) <= layer < 0:
            return layer % len(self.layers)
        raise InputError(f"layer {layer} is not in this result: it has layers "
                         f"{_span(self.layers)}")

    def head_index(self, head: int) -> int:
        if not isinstance(head, int) or isinstance(head, bool) or \
                not -self.n_heads <= head < self.n_heads:
            raise InputError(f"head {head!r} is out of range: layers here have {self.n_heads} "
                             f"heads (0..{self.n_heads - 1})")
        return head % self.n_heads

    def pattern(self, layer: int, head: int) -> torch.Tensor:
        """One head's pattern ``[query, key]``; ``layer`` is the model's layer number.

        >>> p.pattern(1, 3)[-1]              # where the last token looks   # doctest: +SKIP
        """
        return self.patterns[self.layer_index(layer), self.head_index(head)]

    def position(self, pos: int | str, *, query: bool = False) -> int:
        """A key (or query) position given as an index (negative from the end) or a token
        (its label, ``"John (10)"``, or its text when it occurs once)."""
        labels = self.query_tokens if query else self.tokens
        if isinstance(pos, int) and not isinstance(pos, bool):
            if not -len(labels) <= pos < len(labels):
                raise InputError(f"position {pos} is outside the {len(labels)} "
                                 f"{'query' if query else 'key'} positions")
            return pos % len(labels)
        if pos in labels:
            return labels.index(pos)
        found = [i for i, label in enumerate(labels) if label.rsplit(" (", 1)[0] == str(pos)]
        if len(found) == 1:
            return found[0]
        what = "occurs more than once; give its label or index" if found else "is not a token"
        raise InputError(f"{pos!r} {what}: positions are {', '.join(labels)}")

    def top_heads(self, query: int | str = -1, key: int | str = 0,
                  k: int = 5) -> list[tuple[str, float]]:
        """The ``k`` heads that attend most from ``query`` to ``key`` (positions or tokens).

        >>> p.top_heads(query=-1, key="Mary", k=3)   # doctest: +SKIP
        [('L1H3', 0.84...), ('L2H0', 0.41...), ('L0H1', 0.20...)]
        """
        q, kk = self.position(query, query=True), self.position(key)
        scores = self.patterns[:, :, q, kk].flatten()
        order = scores.argsort(descending=True, stable=True)[:k]
        return [(f"L{self.layers[int(i) // self.n_heads]}H{int(i) % self.n_heads}",
                 float(scores[i])) for i in order]

    def show(self, layer: int | None = None, head: int | None = None) -> Any:
        """The attention view: layer/head pickers, the head's token-by-token heatmap and
        every head of the layer as small multiples (click one to pick it)."""
        from ipy_intervene.widgets.attention_view import AttentionView

        return AttentionView(self, layer=layer, head=head)

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        return self.show()._repr_mimebundle_(include=include, exclude=exclude)

    def __repr__(self) -> str:
        return (f"PatternResult({len(self.layers)} layers x {self.n_heads} heads, "
                f"{self.patterns.shape[2]} queries x {len(self.tokens)} keys)")


class PatternBatch(list):
    """Attention patterns of several prompts: ``batch[i]`` is prompt ``i``'s
    :class:`PatternResult` (its own tokens, no padding).

    >>> ps = ii.attention_patterns(model, prompts)                    # doctest: +SKIP
    >>> ps.scores(query=-1, key="Mary").shape     # [prompts, layers, heads]  # doctest: +SKIP
    """

    def scores(self, query: int | str = -1, key: int | str = 0) -> torch.Tensor:
        """Attention from ``query`` to ``key`` (indices in each prompt, or token texts found
        in each) for every prompt, layer and head: ``[prompts, layers, heads]``."""
        rows = []
        for i, p in enumerate(self):
            try:
                q, k = p.position(query, query=True), p.position(key)
            except InputError as e:
                raise InputError(f"prompt {i}: {e.detail}") from None
            rows.append(p.patterns[:, :, q, k])
        return torch.stack(rows)

    def top_heads(self, query: int | str = -1, key: int | str = 0,
                  k: int = 5) -> list[tuple[str, float]]:
        """The ``k`` heads that attend most from ``query`` to ``key``, on average over the
        prompts."""
        mean = self.scores(query, key).mean(0)
        heads = mean.shape[1]
        order = mean.flatten().argsort(descending=True, stable=True)[:k]
        return [(f"L{self[0].layers[int(i) // heads]}H{int(i) % heads}",
                 float(mean.flatten()[i])) for i in order]

    def show(self, prompt: int = 0, layer: int | None = None, head: int | None = None) -> Any:
        """The attention view of prompt ``prompt``."""
        if not -len(self) <= prompt < len(self):
            raise InputError(f"prompt {prompt} is not in this batch of {len(self)} prompts")
        return self[prompt].show(layer=layer, head=head)

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        return self.show()._repr_mimebundle_(include=include, exclude=exclude)

    def __repr__(self) -> str:
        first = self[0]
        return (f"PatternBatch({len(self)} prompts, {len(first.layers)} layers x "
                f"{first.n_heads} heads; show(prompt=i) for one)")


@entry_point
def attention_patterns(model: Any, source: Any, layers: Sequence[int] | None = None, *,
                       tokens: Any = None, prompt: int = 0,
                       batch_size: int | None = None) -> "PatternResult | PatternBatch":
    """Every head's attention pattern for one prompt (one forward), for each prompt of a
    batch (a :class:`PatternBatch`, each prompt without padding, read in chunks of
    ``batch_size``; default: what fits ``ii.cache``'s chunk budget), or patterns a
    ``%%trace`` cell published: a tensor ``[head, query, key]`` or ``[prompt, head, query,
    key]`` (one layer), or a list of them (one per layer).

    ``layers``: the layers to read (default: all); for published patterns, the layer numbers
    of the tensors given (default 0, 1, ...). ``prompt``: the row of a published batch.
    ``tokens`` (published patterns): strings, token ids or the prompt's text; without them
    positions are labelled ``pos 0``, ``pos 1``, ... (never a guess).

    >>> p = ii.attention_patterns(model, prompt)                      # doctest: +SKIP
    >>> ps = ii.attention_patterns(model, [prompt_a, prompt_b])       # doctest: +SKIP
    >>> p = ii.attention_patterns(model, pat, tokens=prompt, layers=[1])  # doctest: +SKIP
    """
    model = wrap(model)
    if _is_published(model, source):
        return _published(model, source, layers, tokens, prompt)
    if tokens is not None:
        raise InputError("tokens= labels published patterns; a prompt's own tokens label it")
    return _read(model, source, layers, batch_size)


def _is_published(model: Model, source: Any) -> bool:
    """Whether ``source`` is patterns a cell published (float tensors, 3-D or 4-D) rather
    than prompts to run; token ids are read like a trace's INPUT (an integer tensor [seq]
    or [batch, seq], or a list of 1-D id tensors of any lengths, left-padded). Anything
    else made of tensors is an error saying what to pass."""
    if isinstance(source, torch.Tensor):
        tensors = [source]
    elif isinstance(source, (list, tuple)) and source and \
            all(isinstance(t, torch.Tensor) for t in source):
        tensors = list(source)
    else:
        return False                                     # prompts, id lists: read them
    floats = [t.is_floating_point() or t.is_complex() for t in tensors]
    if all(floats):
        if any(t.dim() >= 3 for t in tensors):
            return True                                  # _published checks each shape
        shapes = ", ".join(str(list(t.shape)) for t in tensors)
        what = (f"a {tensors[0].dtype} tensor of shape {shapes} is" if len(tensors) == 1 else
                f"{len(tensors)} float tensors of shapes {shapes} are")
        raise InputError(f"{what} neither token ids nor published patterns: {_IDS}; "
                         f"published patterns are float tensors, "
                         f"expected [head, query, key] or [prompt, head, query, key] (the "
                         f"`pattern` site's output, e.g. "
                         f"model.transformer.h[1].attn.pattern.output)")
    if any(floats):
        kinds = ", ".join(str(t.dtype) for t in tensors)
        raise InputError(f"the list mixes float and integer tensors ({kinds}): {_IDS}; "
                         "published patterns are float tensors [head, query, key], one per "
                         "layer")
    if isinstance(source, torch.Tensor):
        if source.dim() not in (1, 2) or source.numel() == 0:
            raise InputError(f"a {source.dtype} tensor of shape {list(source.shape)} is not "
                             f"token ids: {_IDS}")
    else:
        encode_id_list(tensors, model.pad_id, None)   # its errors name the bad item
    return False


_IDS = ("token ids are an integer tensor [seq] (one prompt) or [batch, seq] (prompts of "
        "one length), or a list of 1-D integer tensors (prompts of any lengths, left-padded "
        "like strings), e.g. model.to_tokens(text)[0]")


def _read(model: Model, source: Any, layers: Sequence[int] | None,
          batch_size: int | None) -> "PatternResult | PatternBatch":
    from ipy_intervene.analysis.cache import cache

    warn_if_training(model)
    chosen = _layer_list(layers, adapter_for(model).n_layers)
    kept = cache(model, source, sites="pattern", layers=chosen, batch_size=batch_size,
                 dtype=torch.float32)
    results = PatternBatch(
        PatternResult(torch.stack([kept["pattern", l][i] for l in chosen]),
                      numbered(kept.str_tokens(i)), chosen) for i in range(len(kept)))
    return results[0] if len(results) == 1 and not _is_batch(source) else results


def _is_batch(source: Any) -> bool:
    """A list of prompts (even of one), or ids ``[n, seq]``: a batch; a prompt: not."""
    if isinstance(source, torch.Tensor):
        return source.dim() == 2 and source.shape[0] > 1
    return isinstance(source, (list, tuple)) and not all(isinstance(t, int) for t in source) \
        and len(source) > 1


def _layer_list(layers: Sequence[int] | int | None, n: int) -> list[int]:
    if layers is None:
        return list(range(n))
    given = [layers] if isinstance(layers, int) else list(layers)
    bad = [l for l in given if not isinstance(l, int) or not -n <= l < n]
    if bad or not given:
        raise InputError(f"layers {given} are not all layers of this model: it has {n} "
                         f"layers (0..{n - 1}, or -{n}..-1)")
    return [l % n for l in given]


def _published(model: Model, source: Any, layers: Sequence[int] | None, tokens: Any,
               prompt: int) -> PatternResult:
    tensors = [source] if isinstance(source, torch.Tensor) else list(source)
    planes = [_one_prompt(t, prompt, i) for i, t in enumerate(tensors)]
    if len({p.shape for p in planes}) != 1:
        raise InputError(f"the published patterns differ in shape: "
                         f"{[list(p.shape) for p in planes]}; give one [head, query, key] "
                         "tensor per layer, all of one prompt")
    stacked = torch.stack(planes)
    _check_probabilities(stacked, tensors[0].dtype)
    numbers = list(range(len(planes))) if layers is None else \
        ([layers] if isinstance(layers, int) else list(layers))
    if len(numbers) != len(planes) or len(set(numbers)) != len(numbers):
        raise InputError(f"layers={numbers} must name each of the {len(planes)} published "
                         "pattern(s) once, in order")
    labels = _labels(model, tensors, tokens, prompt, stacked.shape[-1])
    return PatternResult(stacked, labels, numbers)


def _one_prompt(tensor: torch.Tensor, prompt: int, index: int) -> torch.Tensor:
    """``[head, query, key]`` of one prompt, float32 on the CPU."""
    t = tensor.detach()
    if t.dim() == 4:
        if not -t.shape[0] <= prompt < t.shape[0]:
            raise InputError(f"prompt {prompt} is not in the published batch of {t.shape[0]}")
        t = t[prompt]
    if t.dim() != 3 or t.shape[1] > t.shape[2]:
        raise InputError(f"published pattern {index} has shape {list(tensor.shape)}; expected "
                         "[head, query, key] or [prompt, head, query, key] (the `pattern` "
                         "site's output, e.g. model.transformer.h[1].attn.pattern.output)")
    return t.float().cpu()


def _check_probabilities(stacked: torch.Tensor, dtype: torch.dtype) -> None:
    """Patterns are probabilities: an error for scores or a tensor of another site."""
    tol = ROW_SUM_TOL.get(dtype, 2e-2)
    sums = stacked.sum(-1).flatten()
    worst = float(sums[(sums - 1).abs().argmax()])
    if bool((stacked < -tol).any()) or abs(worst - 1) > tol:
        raise InputError(f"these are not attention probabilities: query rows must be >= 0 and "
                         f"sum to 1 (one sums to {worst:.4g}, min value "
                         f"{float(stacked.min()):.4g}). Publish the `pattern` site's output "
                         "(softmax probabilities), e.g. model.transformer.h[1].attn.pattern.output")


def _labels(model: Model, tensors: list[torch.Tensor], tokens: Any, prompt: int,
            length: int) -> list[str]:
    if tokens is not None:
        if isinstance(tokens, (str, torch.Tensor)) and model.tokenizer is not None:
            labels = numbered(model.to_str_tokens(tokens))
        else:
            labels = numbered([str(t) for t in tokens])
        if len(labels) != length:
            raise InputError(f"{len(labels)} tokens for {length} key positions: give tokens= "
                             "of the prompt the patterns were computed from")
        return labels
    ids = input_ids_of(tensors[0])
    if ids is not None and ids.shape[-1] == length and model.tokenizer is not None:
        return numbered(model.to_str_tokens(ids[prompt]))
    return [f"pos {i}" for i in range(length)]


def _span(layers: list[int]) -> str:
    if layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}..{layers[-1]}"
    return ", ".join(map(str, layers))
