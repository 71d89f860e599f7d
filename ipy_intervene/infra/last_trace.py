"""The last trace's token positions, for errors explained after (or outside) its run: the
padded length of its batch, each invoke's own length and its model (weakly); and the
past-the-prompt message that names them.

>>> note_trace(12, widths=[12, 7])
>>> sorted(trace_lengths())
[7, 12]
"""

from __future__ import annotations

import weakref
from typing import Any

_LAST_TRACE: dict[str, Any] = {"length": None, "root": None, "widths": None}


def note_trace(length: int | None, root: Any = None, widths: list[int] | None = None) -> None:
    """Remember the padded length of the token batch the running trace prepared (None for
    tensor inputs), each invoke's own length (``widths``) and its model (weakly): errors
    explained after the cell name them."""
    _LAST_TRACE["length"] = length
    _LAST_TRACE["widths"] = list(widths) if widths is not None else None
    _LAST_TRACE["root"] = weakref.ref(root) if root is not None else None


def trace_length() -> int | None:
    """The padded prompt length of the last trace's token batch (None: tensor inputs)."""
    return _LAST_TRACE["length"]


def trace_lengths() -> set[int]:
    """The positions an invoke of the last trace's token batch can see: each invoke's own
    length (an invoke sees its own prompt's positions), else the padded length."""
    widths = _LAST_TRACE["widths"]
    if widths:
        return set(widths)
    length = _LAST_TRACE["length"]
    return {length} if length is not None else set()


def trace_root() -> Any:
    """The root module of the last trace's model, if it is still alive."""
    ref = _LAST_TRACE["root"]
    return ref() if ref is not None else None


def past_end(index: int, dim: int, size: int, label: str | None, shape: Any = None,
             length: int | None = None, position: bool | None = None) -> str | None:
    """The message for ``index`` past the end of dimension ``dim`` (``size`` entries) of
    ``label``, naming the prompt's length where the dimension is positions: ``position``
    says whether it is (known from the value's layout); None: it is when ``size`` is
    ``length`` or, without one, the own length of an invoke of the last trace (each invoke
    sees its own prompt's positions). Without a label, None unless it is a position.

    >>> past_end(20, 1, 12, "model.transformer.h[1].output[:, 20]", length=12)
    "position 20 is past the prompt in `model.transformer.h[1].output[:, 20]`: the prompt is 12 tokens long (an invoke sees its own prompt's positions; several prompts in one invoke are padded to its longest), so positions run 0..11 (or -12..-1)"
    """
    if position is None:
        lengths = trace_lengths() if length is None else {length}
        position = dim >= 1 and size in lengths
    if position:
        where = f" in `{label}`" if label else ""
        return (f"position {index} is past the prompt{where}: the prompt is {size} tokens "
                f"long (an invoke sees its own prompt's positions; several prompts in one "
                f"invoke are padded to its longest), so positions run 0..{size - 1} (or "
                f"-{size}..-1)")
    if label is None:
        return None
    where = f" (shape {list(shape)})" if shape is not None else ""
    return (f"index {index} is past the end of dimension {dim} of `{label}`{where}: it has "
            f"{size} entries (0..{size - 1}, or -{size}..-1)")
