"""Model inputs: one batch for all the invokes of a trace.

Token models get left-padded ``input_ids``/``attention_mask`` (and position ids that skip
the padding); any other module gets its tensors concatenated along dim 0. ``Batch.rows``
says which rows belong to which invoke.

>>> ids = {"input_ids": torch.tensor([[5, 6]]), "attention_mask": torch.ones(1, 2, dtype=torch.long)}
>>> batch = Batch.concat([ids, ids], pad_id=0, device=torch.device("cpu"), with_positions=False)
>>> batch.size, batch.rows
(2, [slice(0, 1, None), slice(1, 2, None)])
"""

from __future__ import annotations

from typing import Any

import torch

from ipy_intervene.errors import InputError


def describe(x: Any) -> str:
    """A short description of an INPUT for error messages."""
    if isinstance(x, (list, tuple)):
        return f"{type(x).__name__} of {len(x)} item(s)" if x else f"an empty {type(x).__name__}"
    return type(x).__name__


def encode_ids(ids: torch.Tensor, line: int | None) -> dict[str, torch.Tensor]:
    if ids.dtype not in (torch.int64, torch.int32) or ids.dim() not in (1, 2):
        raise InputError(f"token ids must be an integer tensor [seq] or [batch, seq]; got "
                         f"{ids.dtype} of shape {list(ids.shape)}", line=line)
    ids = ids.long().reshape(-1, ids.shape[-1])
    if ids.numel() == 0:
        raise InputError("empty prompt: the token id tensor has no tokens", line=line)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def encode_id_list(items: list[Any], pad_id: int, line: int | None) -> dict[str, torch.Tensor]:
    """A list of 1-D token-id tensors (prompts of any lengths) as one left-padded batch.

    >>> encode_id_list([torch.tensor([5, 6, 7]), torch.tensor([8])], 0, None)["attention_mask"]
    tensor([[1, 1, 1],
            [0, 0, 1]])
    """
    what = ("a list of token-id tensors is a batch of prompts: give each as a 1-D integer "
            "tensor [seq] (model.to_tokens(text)[0]), or all prompts as strings")
    rows = []
    for i, t in enumerate(items):
        if not isinstance(t, torch.Tensor):
            raise InputError(f"item {i} of the INPUT list is a {type(t).__name__}, the others "
                             f"include tensors: {what}", line=line)
        if t.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise InputError(f"item {i} of the INPUT list is a {t.dtype} tensor, not token "
                             f"ids: {what}", line=line)
        if t.dim() == 2 and t.shape[0] == 1:
            t = t[0]
        if t.dim() != 1 or t.numel() == 0:
            raise InputError(f"item {i} of the INPUT list has shape {list(t.shape)}: {what}; "
                             "a batch of prompts of one length can also be one 2-D tensor "
                             "[batch, seq]", line=line)
        rows.append(t.detach().to("cpu", torch.long))
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    return {"input_ids": ids, "attention_mask": mask}


def encode_dict(x: dict, line: int | None) -> dict[str, torch.Tensor]:
    if "input_ids" not in x:
        raise InputError(f"a dict INPUT needs `input_ids`; got keys {sorted(x)}", line=line)
    out = dict(x)
    out.update(encode_ids(torch.as_tensor(x["input_ids"]), line))
    if "attention_mask" in x:
        out["attention_mask"] = _mask_like(torch.as_tensor(x["attention_mask"]),
                                           out["input_ids"], line)
    return out


def _mask_like(mask: torch.Tensor, ids: torch.Tensor, line: int | None) -> torch.Tensor:
    """The attention mask as [batch, seq] like the ids, or an error naming both shapes."""
    if mask.numel() != ids.numel() or mask.shape[-1] != ids.shape[-1]:
        raise InputError(f"the attention mask has shape {list(mask.shape)}, the token ids "
                         f"{list(ids.shape)}: give one mask value (1 = attend, 0 = padding) "
                         "per token", line=line)
    return mask.reshape(ids.shape)


def check_ids(ids: torch.Tensor, vocab_size: int | None, line: int | None) -> None:
    """Token ids must index the embedding: 0 <= id < vocab_size."""
    if vocab_size is None or ids.numel() == 0:
        return
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise InputError(f"token id {bad} is outside this model's vocabulary (ids 0.."
                         f"{vocab_size - 1}); token ids come from the model's own tokenizer "
                         "(model.to_tokens(text))", line=line)


class Batch:
    """The one batch a trace runs: rows per invoke, left padding, positions.

    The forward is ``root(*args, **kwargs)``: token batches have only ``kwargs``
    (``input_ids``, ``attention_mask``, ...); tensor batches of other modules have the
    positional inputs in ``args``. ``rows[i]`` is invoke ``i``'s block of dim 0.
    """

    def __init__(self, kwargs: dict[str, Any], rows: list[slice], args: tuple = (),
                 widths: list[int] | None = None) -> None:
        self.kwargs = kwargs
        self.rows = rows
        self.args = tuple(args)
        self.widths = widths   # token batches: each invoke's own length (its longest prompt)

    def cut(self, invoke: int) -> int:
        """The padding positions invoke ``invoke`` does not see: the batch's padded length
        less the invoke's own (0 for tensor batches, which have no padding).

        >>> ids = {"input_ids": torch.tensor([[5, 6, 7]]), "attention_mask": torch.ones(1, 3)}
        >>> short = {"input_ids": torch.tensor([[8]]), "attention_mask": torch.ones(1, 1)}
        >>> batch = Batch.concat([ids, short], pad_id=0, device=torch.device("cpu"),
        ...                      with_positions=False)
        >>> batch.cut(0), batch.cut(1)
        (0, 2)
        """
        if not self.widths:
            return 0
        return self.length - self.widths[invoke]

    @property
    def size(self) -> int:
        """Rows in the batch: dim 0 of ``input_ids``, else of the first positional tensor
        (then of the first keyword tensor)."""
        ids = self.kwargs.get("input_ids")
        if isinstance(ids, torch.Tensor):
            return int(ids.shape[0])
        for value in (*self.args, *self.kwargs.values()):
            if isinstance(value, torch.Tensor) and value.dim() >= 1:
                return int(value.shape[0])
        return self.rows[-1].stop if self.rows else 1

    @property
    def length(self) -> int:
        """Token positions (with padding); only token batches have them."""
        ids = self.kwargs.get("input_ids")
        if not isinstance(ids, torch.Tensor):
            raise InputError("this batch has tensor inputs, not token ids: it has no "
                             "sequence length")
        return int(ids.shape[1])

    @classmethod
    def join(cls, parts: list[tuple[tuple, dict[str, Any]]], *, device: torch.device,
             line: int | None = None) -> "Batch":
        """Tensor inputs of several invokes as one batch: concatenated along dim 0.

        Each part is one invoke's ``(args, kwargs)``. With one invoke its inputs go to the
        forward unchanged (on ``device``). With several, every tensor is batched: the parts
        must have the same structure, each part's tensors the same dim 0 (its rows), and the
        shapes past dim 0 must agree; values that are not tensors must be equal.
        """
        def move(v: Any) -> Any:
            return v.to(device) if isinstance(v, torch.Tensor) else v

        if len(parts) == 1:
            args, kwargs = parts[0]
            batch = cls({k: move(v) for k, v in kwargs.items()}, [], tuple(map(move, args)))
            batch.rows = [slice(0, batch.size)]
            return batch
        first_args, first_kwargs = parts[0]
        for i, (args, kwargs) in enumerate(parts[1:], 1):
            if len(args) != len(first_args) or set(kwargs) != set(first_kwargs):
                raise InputError(f"invoke {i}'s INPUT is {_structure(args, kwargs)}; invoke 0's "
                                 f"is {_structure(first_args, first_kwargs)}: every invoke "
                                 "must give the model the same inputs", line=line)
        slots = [(f"positional input {j}", [a[j] for a, _ in parts])
                 for j in range(len(first_args))]
        slots += [(f"keyword input `{k}`", [kw[k] for _, kw in parts]) for k in first_kwargs]
        counts: list[int | None] = [None] * len(parts)
        joined = [_join_slot(name, values, counts, line) for name, values in slots]
        if any(n is None for n in counts):
            raise InputError("several invokes need tensor inputs to batch along dim 0; "
                             f"invoke {counts.index(None)}'s INPUT has none", line=line)
        rows, start = [], 0
        for n in counts:
            rows.append(slice(start, start + n))
            start += n
        args = tuple(move(v) for v in joined[:len(first_args)])
        kwargs = {k: move(v) for k, v in zip(first_kwargs, joined[len(first_args):])}
        return cls(kwargs, rows, args)

    @classmethod
    def concat(cls, parts: list[dict[str, Any]], *, pad_id: int, device: torch.device,
               with_positions: bool) -> "Batch":
        width = max(p["input_ids"].shape[1] for p in parts)
        ids, masks, rows, widths, start = [], [], [], [], 0
        for p in parts:
            n, t = p["input_ids"].shape
            widths.append(int(t))
            ids.append(torch.nn.functional.pad(p["input_ids"], (width - t, 0), value=pad_id))
            masks.append(torch.nn.functional.pad(p["attention_mask"], (width - t, 0), value=0))
            rows.append(slice(start, start + n))
            start += n
        kwargs: dict[str, Any] = {"input_ids": torch.cat(ids).to(device),
                                  "attention_mask": torch.cat(masks).to(device)}
        extra = {k for p in parts for k in p} - {"input_ids", "attention_mask"}
        if extra and len(parts) > 1:
            raise InputError(f"extra model kwargs ({', '.join(sorted(extra))}) are only "
                             "supported with a single invoke")
        for key in extra:
            kwargs[key] = parts[0][key]
        if with_positions and "position_ids" not in kwargs:
            kwargs["position_ids"] = positions_from_mask(kwargs["attention_mask"])
        return cls(kwargs, rows, widths=widths)


def _structure(args: tuple, kwargs: dict) -> str:
    parts = [f"{len(args)} positional input(s)"]
    if kwargs:
        parts.append(f"keyword inputs {sorted(kwargs)}")
    return " and ".join(parts)


def _join_slot(name: str, values: list[Any], counts: list[int | None],
               line: int | None) -> Any:
    """One input of every invoke, concatenated along dim 0 (``counts``: rows per invoke)."""
    tensors = [isinstance(v, torch.Tensor) for v in values]
    if not any(tensors):
        for i, v in enumerate(values[1:], 1):
            if not _same(v, values[0]):
                raise InputError(f"{name} is {v!r} in invoke {i} and {values[0]!r} in invoke 0; "
                                 "inputs that are not tensors cannot be batched and must be "
                                 "the same in every invoke", line=line)
        return values[0]
    if not all(tensors):
        i = tensors.index(False)
        raise InputError(f"{name} is a tensor in invoke {tensors.index(True)} but a "
                         f"{type(values[i]).__name__} in invoke {i}", line=line)
    for i, v in enumerate(values):
        if v.dim() == 0:
            raise InputError(f"{name} of invoke {i} is a 0-dim tensor: with several invokes, "
                             "inputs are batched along dim 0, so every tensor needs one",
                             line=line)
        if counts[i] is None:
            counts[i] = int(v.shape[0])
        elif counts[i] != v.shape[0]:
            raise InputError(f"{name} of invoke {i} has {v.shape[0]} rows (shape "
                             f"{list(v.shape)}) but its other inputs have {counts[i]}: the "
                             "tensors of one invoke share dim 0, the batch", line=line)
    for i, v in enumerate(values[1:], 1):
        if v.shape[1:] != values[0].shape[1:]:
            raise InputError(f"{name} has shape {list(v.shape)} in invoke {i} but "
                             f"{list(values[0].shape)} in invoke 0: several invokes are "
                             "concatenated along dim 0 (no padding), so the shapes past dim 0 "
                             "must agree", line=line)
    device = values[0].device
    return torch.cat([v.to(device) for v in values])


def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:  # noqa: BLE001 - values whose == is not a truth value are not the same
        return False


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip left padding: a padded prompt sees the positions it has alone."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)
