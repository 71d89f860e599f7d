"""Where each prompt's tokens sit in a left-padded batch: ``(prompt, token)`` -> the position
in the batch (a trace's tensors of several prompts, from a list INPUT, an invoke given several
prompts or ``_trace.output``, are ``[prompt, padded position, ...]``; an invoke of one prompt
sees that prompt's own positions, with no padding).

A batch of prompts of different lengths is padded on the left, so token ``j`` of prompt ``i``
is at position ``pad[i] + j``; the last token of every prompt is at the last position.

>>> import ipy_intervene as ii
>>> model = ii.load_model("demo")
>>> pos = ii.positions(model, ["When Mary and John went to the store", "Then John had"])
>>> pos.lengths, pos.pad
([9, 4], [0, 5])
>>> pos(1, 0), pos(1, -1), pos(1, "John")
(5, 8, 7)
>>> pos.of("John").tolist()                # one position per prompt: h[range(2), pos.of("John")]
[4, 7]
"""

from __future__ import annotations

from typing import Any

import torch

from ipy_intervene.errors import InputError


class Positions:
    """Padded positions of a batch, from its ``input_ids`` and ``attention_mask`` ``[n, T]``
    (1: a real token; left padding)."""

    def __init__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 decode: Any = None) -> None:
        mask = attention_mask.detach().bool().cpu()
        self.input_ids = input_ids.detach().cpu()
        self.mask = mask
        self.lengths = [int(n) for n in mask.sum(1)]
        self.width = int(mask.shape[1])
        self.pad = [self.width - n for n in self.lengths]
        for i, (row, n) in enumerate(zip(mask, self.lengths)):
            if not bool(row[self.width - n:].all()):
                raise InputError(f"prompt {i}'s attention mask is not left padding (zeros, "
                                 "then ones); positions cannot be mapped")
        self._decode = decode

    def __len__(self) -> int:
        return len(self.lengths)

    def tokens(self, prompt: int) -> list[str]:
        """Prompt ``prompt``'s tokens as strings, padding left out."""
        self._check(prompt)
        ids = self.input_ids[prompt, self.pad[prompt]:].tolist()
        return [self._decode([i]) for i in ids] if self._decode else [str(i) for i in ids]

    def __call__(self, prompt: int, token: int | str, occurrence: int | None = None) -> int:
        """The padded position of ``token`` in prompt ``prompt``: its index in the prompt
        (negative: from the end) or its text (``" John"``, or ``"John"`` ignoring spaces);
        a text that occurs several times needs ``occurrence`` (0: first, -1: last)."""
        self._check(prompt)
        n = self.lengths[prompt]
        if isinstance(token, int) and not isinstance(token, bool):
            if not -n <= token < n:
                raise InputError(f"token {token} is outside prompt {prompt} ({n} tokens)")
            return self.pad[prompt] + token % n
        if not isinstance(token, str):
            raise InputError(f"token must be an index or a token's text; got {token!r}")
        words = self.tokens(prompt)
        found = [j for j, w in enumerate(words) if w == token] or \
            [j for j, w in enumerate(words) if w.strip() == token.strip()]
        if not found:
            raise InputError(f"{token!r} is not a token of prompt {prompt}: its tokens are "
                             f"{words}")
        if len(found) > 1 and occurrence is None:
            raise InputError(f"{token!r} occurs {len(found)} times in prompt {prompt} (tokens "
                             f"{found}); say which: occurrence=0 (first) or -1 (last)")
        if occurrence is not None and not -len(found) <= occurrence < len(found):
            raise InputError(f"{token!r} occurs {len(found)} time(s) in prompt {prompt}; "
                             f"occurrence {occurrence} does not exist")
        return self.pad[prompt] + found[occurrence or 0]

    def of(self, token: int | str, occurrence: int | None = None) -> torch.Tensor:
        """One padded position per prompt (``[n]``, long), to index ``[prompt, pos]`` tensors:
        ``h[torch.arange(len(pos)), pos.of("John", occurrence=-1)]``."""
        return torch.tensor([self(i, token, occurrence) for i in range(len(self))])

    def unpad(self, x: torch.Tensor, prompt: int, dim: int = 1) -> torch.Tensor:
        """Prompt ``prompt``'s row of a batch tensor ``[n, T, ...]`` without its padding
        (position dim ``dim`` of the batch tensor)."""
        self._check(prompt)
        if x.shape[dim] != self.width:
            raise InputError(f"the tensor has {x.shape[dim]} positions on dim {dim}; this "
                             f"batch has {self.width}")
        return x[prompt].narrow(dim - 1, self.pad[prompt], self.lengths[prompt])

    def _check(self, prompt: int) -> None:
        if not isinstance(prompt, int) or not 0 <= prompt < len(self):
            raise InputError(f"prompt {prompt!r} is not in this batch of {len(self)} prompts "
                             f"(0..{len(self) - 1})")

    def __repr__(self) -> str:
        return f"Positions({len(self)} prompts, lengths {self.lengths}, width {self.width})"


def positions(source: Any, prompts: Any = None) -> Positions:
    """The positions of a batch: ``ii.positions(model, prompts)`` (the prompts as a trace
    pads them), or of a trace's batch: ``ii.positions(_trace)``.

    >>> pos = ii.positions(model, ["Mary had", "Then John had"])       # doctest: +SKIP
    >>> h[1, pos(1, "John")]                                          # doctest: +SKIP
    """
    decode = None
    if prompts is None:
        ids, mask = getattr(source, "input_ids", None), getattr(source, "attention_mask", None)
        if ids is None or mask is None:
            raise InputError("ii.positions(model, prompts) or ii.positions(trace_result); "
                             f"{type(source).__name__} carries no batch")
        model = getattr(source, "model", None)
    else:
        from ipy_intervene.model.loading import wrap

        model = wrap(source)
        batch = model.prepare([prompts] if isinstance(prompts, str) else list(prompts))
        ids, mask = batch.kwargs["input_ids"], batch.kwargs["attention_mask"]
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is not None:
        decode = tokenizer.decode
    return Positions(ids, mask, decode)
