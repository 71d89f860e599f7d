"""Logit lens: the residual stream after each layer, decoded through the final norm and the
unembedding.

>>> import ipy_intervene as ii
>>> model = ii.load_model("demo")
>>> lens = ii.lens(model, "When Mary and John went to the store , John gave a drink to")
>>> lens.top(layer=-1, pos=-1, k=1)[0][0]
'Mary'
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ipy_intervene.errors import InputError
from ipy_intervene.batch import Batch
from ipy_intervene.loading import wrap
from ipy_intervene.model import Model
from ipy_intervene.sites import adapter_for, get_path
from ipy_intervene.hooks import entry_point, site_hooks
from ipy_intervene.sweep.inputs import first_prompt_tokens, numbered


@dataclass
class LensResult:
    """Next-token probabilities decoded from every layer: ``probs[layer, pos, vocab]``."""

    probs: torch.Tensor
    tokens: list[str]                  # a label per position
    layers: list[int]
    decode: Any

    def top(self, layer: int, pos: int, k: int = 5) -> list[tuple[str, float]]:
        """The ``k`` likeliest tokens read off ``layer`` at ``pos``."""
        top = self.probs[layer, pos].topk(k)
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
def lens(model: Any, source: Any, *, tokens: Sequence[str] | None = None,
         prompt: int = 0) -> LensResult:
    """Logit lens of a prompt (runs one forward), or of residual streams a ``%%trace`` cell
    published: a list of tensors ``[batch, pos, d]``, one per layer.

    >>> ii.lens(model, acts, tokens=model.to_str_tokens(prompt))      # doctest: +SKIP
    """
    model = wrap(model)
    adapter = adapter_for(model)
    with torch.no_grad():
        if isinstance(source, (list, tuple)) and source and isinstance(source[0], torch.Tensor):
            streams = list(source)
            labels = list(tokens) if tokens is not None else [str(i) for i in
                                                               range(streams[0].shape[-2])]
        else:
            streams, batch = _streams(model, adapter, source)
            labels = first_prompt_tokens(model, batch)
        probs = torch.stack([_decode(model, adapter, h, prompt) for h in streams])
    if len(labels) != probs.shape[1]:
        raise InputError(f"{len(labels)} token labels for {probs.shape[1]} positions")
    decode = model.tokenizer.decode if model.tokenizer is not None else str
    return LensResult(probs, numbered(labels), list(range(len(streams))), decode)


def _streams(model: Model, adapter: Any, prompt: Any) -> tuple[list[torch.Tensor], Batch]:
    batch = model.prepare([prompt])
    streams: list[Any] = [None] * adapter.n_layers
    hooks = [(adapter.block(model.module, l), "block_out",
              lambda x, l=l: streams.__setitem__(l, x)) for l in range(adapter.n_layers)]
    with site_hooks(hooks):
        model.module(**batch.kwargs)
    return streams, batch


def _decode(model: Model, adapter: Any, hidden: torch.Tensor, prompt: int) -> torch.Tensor:
    if hidden.dim() == 2:
        hidden = hidden[None]
    normed = get_path(model.module, adapter.final_norm)(hidden[prompt: prompt + 1])
    logits = get_path(model.module, adapter.unembed)(normed)[0]
    return logits.float().softmax(-1).cpu()
