"""Reading and patching one site with plain forward hooks (registered only while used).

>>> with site_hooks([(block, "block_in", seen.append)]):   # doctest: +SKIP
...     model(**inputs)
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

from ipy_intervene.sites import Where

SiteFn = Callable[[torch.Tensor], "torch.Tensor | None"]


def first_tensor(value: Any) -> torch.Tensor:
    """The activation in a module's output: the tensor itself, or the first of a tuple."""
    return value[0] if isinstance(value, (tuple, list)) else value


def _replace_first(value: Any, new: torch.Tensor) -> Any:
    if isinstance(value, tuple):
        return (new, *value[1:])
    if isinstance(value, list):
        return [new, *value[1:]]
    return new


def _pre_hook(fn: SiteFn) -> Callable:
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> Any:
        if args:
            new = fn(args[0])
            return None if new is None else ((new, *args[1:]), kwargs)
        name = "hidden_states" if "hidden_states" in kwargs else next(iter(kwargs))
        new = fn(kwargs[name])
        return None if new is None else (args, {**kwargs, name: new})
    return hook


def _out_hook(fn: SiteFn) -> Callable:
    def hook(module: nn.Module, args: tuple, output: Any) -> Any:
        new = fn(first_tensor(output))
        return None if new is None else _replace_first(output, new)
    return hook


def register(module: nn.Module, where: Where, fn: SiteFn) -> Any:
    """Call ``fn`` on the site's tensor; a tensor it returns replaces the site's value."""
    if where in ("block_in", "module_in"):
        return module.register_forward_pre_hook(_pre_hook(fn), with_kwargs=True)
    return module.register_forward_hook(_out_hook(fn))


@contextmanager
def site_hooks(hooks: Iterable[tuple[nn.Module, Where, SiteFn]]) -> Iterator[None]:
    """Hooks that live for the ``with`` block only, removed even if it fails."""
    handles = []
    try:
        for module, where, fn in hooks:
            handles.append(register(module, where, fn))
        yield
    finally:
        for handle in handles:
            handle.remove()
