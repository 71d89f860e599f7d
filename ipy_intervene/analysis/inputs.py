"""Sweep inputs: clean/corrupted pairs that line up token for token, grids, subjects, noise."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ipy_intervene.errors import InputError, SiteError
from ipy_intervene.model.batch import Batch
from ipy_intervene.model.envoys import Model


def prepare_pair(model: Model, clean: Any, corrupted: Any) -> tuple[Batch, Batch]:
    """Batches of the clean and corrupted prompts; an error unless they align token for token."""
    a, b = model.prepare([clean]), model.prepare([corrupted])
    if a.size != b.size:
        raise InputError(f"{a.size} clean prompt(s) but {b.size} corrupted prompt(s); a sweep "
                         "patches between pairs, so give the same number of each")
    mask_a, mask_b = a.kwargs["attention_mask"], b.kwargs["attention_mask"]
    if a.length != b.length or not torch.equal(mask_a, mask_b):
        row = _first_mismatch(mask_a, mask_b)
        raise InputError(
            f"clean and corrupted prompt {row} have different token lengths "
            f"({_count(mask_a, row)} vs {_count(mask_b, row)} tokens): position p of one must "
            f"be position p of the other. Clean: {_tokens(model, a, row)}; corrupted: "
            f"{_tokens(model, b, row)}. Reword one so both tokenize to the same length.")
    return a, b


def _first_mismatch(a: torch.Tensor, b: torch.Tensor) -> int:
    counts_a, counts_b = a.sum(-1), b.sum(-1)
    for row in range(min(len(counts_a), len(counts_b))):
        if counts_a[row] != counts_b[row]:
            return row
    return 0


def _count(mask: torch.Tensor, row: int) -> int:
    return int(mask[row].sum()) if row < len(mask) else 0


def _tokens(model: Model, batch: Batch, row: int) -> list[str]:
    ids = batch.kwargs["input_ids"][row][batch.kwargs["attention_mask"][row].bool()]
    return model.to_str_tokens(ids) if model.tokenizer is not None else ids.tolist()


def token_labels(model: Model, batch: Batch) -> list[str]:
    """Labels of the positions: the first prompt's tokens, numbered so repeats stay distinct."""
    return numbered(first_prompt_tokens(model, batch))


def first_prompt_tokens(model: Model, batch: Batch) -> list[str]:
    """The first prompt's tokens as strings (their ids without a tokenizer), padding included."""
    ids = batch.kwargs["input_ids"][0]
    return model.to_str_tokens(ids) if model.tokenizer is not None else [str(int(i)) for i in ids]


def numbered(words: Sequence[str]) -> list[str]:
    """``["When", " Mary"]`` -> ``["When (0)", "Mary (1)"]``: plot labels that stay distinct."""
    return [f"{w.strip() or repr(w)} ({i})" for i, w in enumerate(words)]


def index_list(values: Sequence[int] | int | None, size: int, what: str) -> list[int]:
    """``None`` -> ``0..size-1``; negative indices count from the end; range-checked."""
    if values is None:
        return list(range(size))
    values = [values] if isinstance(values, int) else list(values)
    out = []
    for v in values:
        if not isinstance(v, int) or not -size <= v < size:
            raise SiteError(f"{what} {v!r} is out of range: there are {size} {what}s "
                            f"(0..{size - 1}, or -{size}..-1)")
        out.append(v % size)
    if not out:
        raise SiteError(f"the list of {what}s is empty")
    return out


def subject_mask(model: Model, batch: Batch, subject: Any) -> torch.Tensor:
    """``[rows, P]`` bool: the subject's tokens in each prompt.

    ``subject`` is a string found in every prompt (or one string per prompt), or token
    positions (a list of ints, or one list per prompt).
    """
    rows, length = batch.size, batch.length
    if subject is None:
        raise InputError("causal tracing (method='noise') needs subject=: the subject's text "
                         "(e.g. subject='Eiffel Tower') or its token positions")
    items = subject if isinstance(subject, (list, tuple)) and subject and not isinstance(
        subject[0], int) else [subject] * rows
    if len(items) != rows:
        raise InputError(f"{len(items)} subjects for {rows} prompts; give one, or one per prompt")
    mask = torch.zeros(rows, length, dtype=torch.bool)
    for row, item in enumerate(items):
        positions = item if isinstance(item, (list, tuple)) else _find(model, batch, row, item)
        mask[row, index_list(positions, length, "position")] = True
    return mask


def _find(model: Model, batch: Batch, row: int, text: str) -> list[int]:
    ids = batch.kwargs["input_ids"][row].tolist()
    for variant in (text, " " + text):
        sub = model.tokenizer(variant, add_special_tokens=False)["input_ids"]
        for start in range(len(ids) - len(sub) + 1):
            if sub and ids[start: start + len(sub)] == sub:
                return list(range(start, start + len(sub)))
    raise InputError(f"subject {text!r} is not in prompt {row}: its tokens "
                     f"{model.to_str_tokens(batch.kwargs['input_ids'][row])} do not contain "
                     f"those of the subject")


def subject_noise(mask: torch.Tensor, width: int, samples: int, std: float,
                  seed: int) -> torch.Tensor:
    """``[samples * rows, P, width]`` Gaussian noise on the subject tokens, zero elsewhere.

    Drawn on the CPU from ``torch.Generator().manual_seed(seed)`` as one
    ``randn(samples, rows, P, width)``, so a run is the same on every device.
    """
    rows, length = mask.shape
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(samples, rows, length, width, generator=gen, dtype=torch.float32) * std
    return (noise * mask[None, :, :, None]).reshape(samples * rows, length, width)
