"""Checks that keep a word, an answer or a model kwarg from silently meaning something else.

- A word the tokenizer does not know becomes its unknown token (``<unk>``) on word-level
  tokenizers such as the demo's: ``logit_diff("Mary", "Jon")`` would measure ``<unk>``.
- A misspelled model kwarg (``attention_masks``) would be swallowed by a forward's
  ``**kwargs``.

>>> import ipy_intervene as ii
>>> unknown_words(ii.load_model("demo").tokenizer, "When Mary and Jon went")
['Jon']
"""

from __future__ import annotations

import difflib
import inspect
from typing import Any, Iterable

from ipy_intervene.errors import InputError


def unknown_words(tokenizer: Any, text: str) -> list[str]:
    """The whitespace-separated words of ``text`` that tokenize to the unknown token
    (tokenizers without one, like GPT-2's byte-level BPE, know every word)."""
    unk = getattr(tokenizer, "unk_token", None)
    unk_id = getattr(tokenizer, "unk_token_id", None)
    if unk is None or unk_id is None:
        return []
    return [word for word in text.split()
            if word != unk and unk_id in tokenizer(word, add_special_tokens=False)["input_ids"]]


def check_known(tokenizer: Any, texts: Iterable[str], ids: Any, *,
                line: int | None = None) -> None:
    """An :class:`InputError` naming the words of ``texts`` this tokenizer does not know."""
    unk_id = getattr(tokenizer, "unk_token_id", None)
    if unk_id is None or not bool((ids == unk_id).any()):
        return
    words = sorted({w for text in texts for w in unknown_words(tokenizer, text)})
    if words:
        raise InputError(f"this tokenizer does not know {', '.join(map(repr, words))}: it "
                         f"would read {'them' if len(words) > 1 else 'it'} as "
                         f"{tokenizer.unk_token!r}. Use words of its vocabulary "
                         f"(model.to_str_tokens(text) shows how it reads a text)", line=line)


def check_kwargs(forward: Any, keys: Iterable[str], owner: str, *,
                 line: int | None = None) -> None:
    """An :class:`InputError` for a key that is not a named parameter of ``forward``."""
    params = inspect.signature(forward).parameters
    named = [n for n, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        named += _transformers_kwargs()
    for key in keys:
        if key not in named:
            close = difflib.get_close_matches(key, named, n=1)
            hint = f" Did you mean `{close[0]}`?" if close else ""
            raise InputError(f"`{key}` is not a parameter of {owner}.forward, so the model "
                             f"would ignore it.{hint}", line=line)


def _transformers_kwargs() -> list[str]:
    """The keywords a transformers model's ``**kwargs`` takes (``output_attentions``, ...)."""
    try:
        from transformers.utils.generic import TransformersKwargs
    except ImportError:  # an older transformers: its forwards name these parameters
        return []
    return list(TransformersKwargs.__annotations__)
