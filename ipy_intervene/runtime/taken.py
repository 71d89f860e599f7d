"""What an invoke takes from the set-up when it is registered, and whether a later
statement of the set-up changed it in place (``vec *= 2``, ``cfg["coef"] = c``,
``obj.scale = s``): the forward runs after the whole set-up, so that invoke would see the
change. New items (a key, an appended element) are not changes.

>>> d = {"coef": 1.0}
>>> seen = fingerprint(d)
>>> d["other"] = 2; changed(seen, d)
False
>>> d["coef"] = 3.0; changed(seen, d)
True
"""

from __future__ import annotations

from types import FunctionType, ModuleType
from typing import Any

import torch
from torch import nn

LIMIT = 10_000  # larger containers are not fingerprinted (cost)


def fingerprint(value: Any) -> tuple | None:
    """The identity of what ``value`` holds now, or None where it cannot change unseen."""
    if isinstance(value, torch.Tensor):
        return None if value.is_inference() else ("tensor", value._version)
    if isinstance(value, (str, bytes, int, float, complex, bool, type, ModuleType,
                          FunctionType, nn.Module)) or value is None:
        return None
    if isinstance(value, dict) and len(value) <= LIMIT:
        return ("items", {k: _identity(v) for k, v in value.items()})
    if isinstance(value, list) and len(value) <= LIMIT:
        return ("items", {k: _identity(v) for k, v in enumerate(value)})
    fields = getattr(value, "__dict__", None)
    if isinstance(fields, dict) and len(fields) <= LIMIT and not hasattr(value, "__slots__"):
        return ("items", {k: _identity(v) for k, v in fields.items()})
    return None


def _identity(item: Any) -> tuple[int, int]:
    """An item's object, and for a tensor its version (``coefs[0].fill_(c)`` changes it)."""
    version = item._version if isinstance(item, torch.Tensor) and not item.is_inference() else 0
    return id(item), version


def changed(seen: tuple, value: Any) -> bool:
    """Whether ``value`` changed in place since ``seen = fingerprint(value)``."""
    if seen[0] == "tensor":
        return value._version != seen[1]
    now = fingerprint(value)
    if now is None:
        return False
    return any(k not in now[1] or now[1][k] != v for k, v in seen[1].items())
