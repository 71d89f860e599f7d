"""Where a model runs: the device its inputs go to, also when accelerate offloads weights.

A model loaded with ``device_map`` and offloading (``{"": "disk"}``, or ``"auto"`` with a
small ``max_memory``) keeps some or all parameters on the ``meta`` device; accelerate's hooks
move each module's weights to its ``execution_device`` when it runs. Inputs must go there.

>>> import torch
>>> input_device(torch.nn.Linear(2, 2))
device(type='cpu')
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

CPU = torch.device("cpu")


def input_device(module: nn.Module) -> torch.device:
    """The device inputs of ``module`` go to: where its input embeddings (or first parameter,
    or first buffer) live, or, when those are offloaded to ``meta``, where accelerate runs them.

    >>> input_device(torch.nn.Linear(2, 2, device="meta"))   # meta without hooks stays meta
    device(type='meta')
    """
    embedding = _input_embeddings(module)
    tensor = _first_tensor(embedding) if embedding is not None else None
    if tensor is None:
        tensor = _first_tensor(module)
    if tensor is not None and tensor.device.type != "meta":
        return tensor.device
    offloaded = execution_device(embedding, module)
    if offloaded is not None:
        return offloaded
    return tensor.device if tensor is not None else CPU


def execution_device(*modules: nn.Module | None) -> torch.device | None:
    """The ``execution_device`` of the first accelerate hook found on ``modules`` (in order),
    then on any submodule, then from ``hf_device_map``; None when nothing is offloaded.

    >>> execution_device(torch.nn.Linear(2, 2)) is None
    True
    """
    present = [m for m in modules if m is not None]
    for candidate in [*present, *(sub for m in present for sub in m.modules())]:
        device = _hook_device(getattr(candidate, "_hf_hook", None))
        if device is not None:
            return device
    for m in present:
        device = _map_device(getattr(m, "hf_device_map", None))
        if device is not None:
            return device
    return None


def _input_embeddings(module: nn.Module) -> nn.Module | None:
    get = getattr(module, "get_input_embeddings", None)
    try:
        embedding = get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        return None
    return embedding if isinstance(embedding, nn.Module) else None


def _first_tensor(module: nn.Module) -> torch.Tensor | None:
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor):
        return weight
    param = next(module.parameters(), None)
    return param if param is not None else next(module.buffers(), None)


def _hook_device(hook: Any) -> torch.device | None:
    """An ``AlignDevicesHook``'s execution device, also inside a ``SequentialHook``."""
    if hook is None:
        return None
    for inner in getattr(hook, "hooks", None) or (hook,):
        device = getattr(inner, "execution_device", None)
        if device is not None:
            return torch.device(device)
    return None


def _map_device(device_map: Any) -> torch.device | None:
    """The first real device of an ``hf_device_map`` (``"disk"`` runs on the CPU)."""
    if not isinstance(device_map, dict) or not device_map:
        return None
    for placed in device_map.values():
        if placed not in ("disk", "meta"):
            return torch.device(placed)
    return CPU
