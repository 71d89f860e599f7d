"""A shallow clone of a module tree: new ``nn.Module`` objects that share every Parameter
and buffer tensor of the original (no weight is copied), with hook tables, configs and
train/eval flags of their own. Hooks put on the clone never act on the original, and the
clone follows the original's tensors: a forward of the clone first takes the original's
current Parameter and buffer objects (so ``model.module.half()`` reaches both, buffers
included), while a conversion of the clone itself that would change a tensor is refused
(it would change the original's parameters in place but not its buffers).

>>> import ipy_intervene as ii
>>> model = ii.load_model("demo")
>>> twin = shallow_clone(model.module)
>>> twin is model.module, twin.transformer.wte.weight is model.module.transformer.wte.weight
(False, True)
"""

from __future__ import annotations

import copy
import functools
import types
from collections import OrderedDict
from typing import Any, Callable

import torch
from torch import nn

from ipy_intervene.errors import InterventionError

#: The hook tables of an ``nn.Module``: a clone starts with each of them empty.
HOOK_TABLES = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks",
               "_backward_pre_hooks", "_state_dict_hooks", "_state_dict_pre_hooks",
               "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")


class Pairs:
    """Each (clone, original) module pair, for :meth:`follow`."""

    def __init__(self, source: nn.Module) -> None:
        self.source = source
        self.pairs: list[tuple[nn.Module, nn.Module]] = []

    def follow(self) -> None:
        """The clone's Parameter and buffer objects are the original's current ones (a
        clone of a clone first has its source follow its own original)."""
        upstream = getattr(self.source, "_ii_pairs", None)
        if upstream is not None:
            upstream.follow()
        for new, old in self.pairs:
            for table in ("_parameters", "_buffers"):
                mine, theirs = new.__dict__[table], old.__dict__[table]
                if any(mine.get(k) is not v for k, v in theirs.items()) or mine.keys() != \
                        theirs.keys():
                    mine.clear()
                    mine.update(theirs)


def shallow_clone(root: nn.Module, configs: dict[int, Any] | None = None) -> nn.Module:
    """A clone of ``root``'s module tree sharing its tensors (see the module docstring); the
    pairs are in ``clone._ii_pairs`` (:class:`Pairs`)."""
    if getattr(root, "hf_device_map", None) or any(hasattr(m, "_hf_hook") for m in root.modules()):
        raise InterventionError(
            "this model is dispatched by accelerate (device_map=...): its modules carry "
            "accelerate's hooks, which a clone cannot share. Edit it in place (--edit NAME "
            "--inplace, ii.edit(..., inplace=True)); ii.clear_edits(model) removes the edit")
    memo: dict[int, nn.Module] = {}
    pairs = Pairs(root)
    configs = {} if configs is None else configs
    clone = _clone(root, memo, pairs, configs)
    object.__setattr__(clone, "_ii_pairs", pairs)
    return clone


def _clone(module: nn.Module, memo: dict[int, nn.Module], pairs: Pairs,
           configs: dict[int, Any]) -> nn.Module:
    if id(module) in memo:   # a module reachable twice stays one module
        return memo[id(module)]
    new = copy.copy(module)   # a new __dict__ holding the same values
    memo[id(module)] = new
    pairs.pairs.append((new, module))
    state = new.__dict__
    state["_parameters"] = dict(module._parameters)
    state["_buffers"] = dict(module._buffers)
    state["_non_persistent_buffers_set"] = set(module._non_persistent_buffers_set)
    for table in HOOK_TABLES:
        if table in state:
            state[table] = OrderedDict()
    state["_modules"] = {k: None if c is None else _clone(c, memo, pairs, configs)
                         for k, c in module._modules.items()}
    state.pop("_output_capturing_hooks_installed", None)   # transformers': its hooks are not here
    config = state.get("config")
    if config is not None and hasattr(config, "to_dict"):   # its own attention setting
        state["config"] = configs.setdefault(id(config), copy.deepcopy(config))
    for key, value in list(state.items()):
        if isinstance(value, types.MethodType) and value.__self__ is module:
            state[key] = types.MethodType(value.__func__, new)   # e.g. a forward set on it
        elif isinstance(value, functools.partial) and module in value.args:
            raise InterventionError(
                f"{type(module).__name__} has `{key}` set to a function bound to the module "
                "itself (a wrapper such as accelerate's): a clone would run the original. "
                "Edit the model in place (--inplace, ii.edit(..., inplace=True))")
    state["_apply"] = _refuse_changes(new, module)
    return new


def _refuse_changes(new: nn.Module, old: nn.Module) -> Callable[..., nn.Module]:
    """The clone's ``_apply`` (what ``.to``, ``.half``, ``.cuda`` call): a conversion that
    leaves every tensor as it is passes (a pipeline calls ``.to(device)`` on its model);
    one that would change a tensor is refused, with the way to do it."""
    def _apply(fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> nn.Module:
        tensors = [*new.parameters(recurse=recurse), *new.buffers(recurse=recurse)]
        if all(fn(t) is t for t in tensors):
            return new
        raise InterventionError(
            "this is an edited model (ii.edit / %%trace --edit): it shares every weight with "
            "the model it was made from, so converting it (.to/.half/.cuda/...) would change "
            "that model's parameters but not its buffers. Convert the original model instead "
            "(the edited model follows it at its next forward), or make the edit in place")

    return _apply
