"""A trace's INPUT as model inputs: prompts and token ids tokenized and left-padded, tensors of
other modules passed as they are (the :class:`~ipy_intervene.model.batch.Batch` of all invokes).

>>> import ipy_intervene as ii
>>> model = ii.load_model("demo")
>>> prepare(model, ["When Mary", "Then John went"]).rows
[slice(0, 1, None), slice(1, 2, None)]
"""

from __future__ import annotations

from typing import Any

import torch

from ipy_intervene.errors import InputError
from ipy_intervene.habits.explain import check_output_attentions
from ipy_intervene.infra import active
from ipy_intervene.infra.last_trace import note_trace
from ipy_intervene.model.batch import (
    Batch,
    check_ids,
    describe,
    encode_dict,
    encode_id_list,
    encode_ids,
)
from ipy_intervene.model.tokens import check_known, check_kwargs


def prepare(model: Any, inputs: list[Any], *, line: int | None = None,
            new_tokens: int = 0) -> Batch:
    """The inputs of all invokes of ``model`` (an :class:`~ipy_intervene.model.envoys.Model`) as
    one batch; ``new_tokens``: what generate adds."""
    positional = [is_positional(model, x) for x in inputs]
    if any(positional):
        if not all(positional):
            if not model.is_token_model:  # names what this module takes instead
                encode(model, inputs[positional.index(False)], line)
            kinds = ", ".join(f"invoke {i} {'tensors' if p else 'token inputs'}"
                              for i, p in enumerate(positional))
            raise InputError(f"the invokes mix token inputs (prompts, token ids) and "
                             f"tensor inputs ({kinds}); give every invoke the same kind",
                             line=line)
        parts = [encode_tensors(x, line) for x in inputs]
        if active.current_trace() is not None:
            note_trace(None, model.module)
        return Batch.join(parts, device=model.device, line=line)
    encoded = [encode(model, x, line) for x in inputs]
    batch = Batch.concat(encoded, pad_id=model.pad_id, device=model.device,
                         with_positions="position_ids" in model._forward_params)
    check_ids(batch.kwargs["input_ids"], model.vocab_size, line)
    if active.current_trace() is not None:  # the trace's batch: named by position errors
        note_trace(batch.length, model.module, batch.widths)
    limit = model.max_length
    if limit is not None and batch.length + new_tokens > limit:
        more = f" and generate adds {new_tokens}" if new_tokens else ""
        raise InputError(f"the prompt is {batch.length} tokens long{more}; this model has "
                         f"{limit} positions. Shorten the prompt (or its batch's longest "
                         f"prompt){' or generate fewer tokens' if new_tokens else ''}",
                         line=line)
    return batch


def is_positional(model: Any, x: Any) -> bool:
    """Whether ``x`` goes to the forward as it is (tensors), not as tokens.

    For a token model a list of integer tensors is a batch of prompts (token ids); a tuple
    of tensors that are not all integers is positional inputs, and so are float tensors
    unless the forward's first argument is ``input_ids``."""
    tensors = isinstance(x, (tuple, list)) and x and all(isinstance(v, torch.Tensor) for v in x)
    if not model.is_token_model:
        return bool(tensors) or isinstance(x, (torch.Tensor, tuple, dict))
    if tensors:
        return not all(map(_integer, x)) and (
            isinstance(x, tuple) or model._first_param != "input_ids")
    return (isinstance(x, torch.Tensor) and not _integer(x)
            and model._first_param != "input_ids")


def _integer(t: torch.Tensor) -> bool:
    return not (t.is_floating_point() or t.is_complex())


def encode_tensors(x: Any, line: int | None) -> tuple[tuple, dict[str, Any]]:
    """One invoke's tensor INPUT as the forward's ``(args, kwargs)``."""
    if isinstance(x, torch.Tensor):
        return (x,), {}
    if isinstance(x, (tuple, list)):
        return tuple(x), {}
    if not all(isinstance(k, str) for k in x):
        raise InputError(f"a dict INPUT maps keyword names to values; got keys "
                         f"{list(x)!r}", line=line)
    return (), dict(x)


def encode(model: Any, x: Any, line: int | None) -> dict[str, torch.Tensor]:
    """One invoke's token INPUT as ``input_ids`` and ``attention_mask`` (left-padded)."""
    module = model.module
    if not model.is_token_model:
        raise InputError(f"{type(module).__name__}.forward takes no `input_ids`: "
                         "INPUT must be a tensor (one positional input, [batch, ...]), a "
                         "tuple of positional inputs or a dict of keyword inputs; got "
                         f"{describe(x)}", line=line)
    if isinstance(x, str):
        x = [x]
    if isinstance(x, dict):
        check_kwargs(module.forward, x, type(module).__name__, line=line)
        check_output_attentions(module, x, line)
        return encode_dict(x, line)
    if isinstance(x, torch.Tensor):
        return encode_ids(x, line)
    if isinstance(x, (list, tuple)) and x and all(isinstance(s, str) for s in x):
        return tokenize(model.tokenizer, list(x), line)
    if isinstance(x, (list, tuple)) and x and all(isinstance(s, int) for s in x):
        return encode_ids(torch.tensor(x), line)
    if isinstance(x, (list, tuple)) and any(isinstance(v, torch.Tensor) for v in x):
        return encode_id_list(list(x), model.pad_id, line)
    raise InputError(f"INPUT must be a prompt string, a list of prompts, a tensor of token "
                     f"ids ([seq] or [batch, seq]), a list of 1-D token-id tensors or a dict "
                     f"of model kwargs; got {describe(x)}", line=line)


def tokenize(tokenizer: Any, texts: list[str], line: int | None) -> dict[str, torch.Tensor]:
    """Prompts as left-padded ``input_ids`` and ``attention_mask``."""
    for text in texts:
        if not text.strip():
            raise InputError("empty prompt: every prompt needs at least one word", line=line)
    if tokenizer is None:
        raise InputError("this model has no tokenizer: pass token ids (a tensor) or "
                         "ii.wrap(module, tokenizer)", line=line)
    enc = tokenizer(texts, padding=True, padding_side="left", return_tensors="pt")
    check_known(tokenizer, texts, enc["input_ids"], line=line)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
