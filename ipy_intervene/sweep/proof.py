"""The proof that a kept sweep is current (``sweep/memo.py`` keeps, this proves): cheap
checks that turn most changes away at once (:func:`model_state`: an order-sensitive
:func:`checksum` of every weight, the module tree, the configs), then a forward whose every
module output is fingerprinted (:class:`Witness`), compared bit for bit.

>>> x = torch.randn(2, 3, 8)
>>> torch.equal(fingerprint(x), fingerprint(x.clone()))
True
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ipy_intervene.edits.api import edit_keys, is_edit_hook
from ipy_intervene.infra.hooks import HookSession, first_tensor

# -- the proof ------------------------------------------------------------------------------

@dataclass(eq=False)
class Witness:
    """What one forward of the sweep's prompts computes, kept to compare bit for bit: the
    token ids and mask, the metric's answer ids, and a fingerprint of every module's output
    (each call, in call order: one integer per row and position, see :func:`fingerprint`)."""

    inputs: list[torch.Tensor]
    answers: list[torch.Tensor]
    prints: list[torch.Tensor]

    @classmethod
    def of(cls, model: Any, options: dict[str, Any], metric: Any) -> "Witness | None":
        """The witness of the sweep's clean and corrupted prompts on ``model`` now; None when
        they cannot be prepared (the sweep itself will say what is wrong)."""
        from ipy_intervene.model.loading import wrap

        try:
            model = wrap(model)
            prompts = [options["clean"]] + ([options["corrupted"]]
                                             if options.get("corrupted") is not None else [])
            batches = [model.prepare([p]) for p in prompts]
            n_prompts = batches[0].size
            answers = [metric._ids(model, a, n_prompts) for a in metric.answers]
        except Exception:  # noqa: BLE001 - bad input: the sweep raises its own clear error
            return None
        inputs = [t for b in batches for t in b.kwargs.values() if isinstance(t, torch.Tensor)]
        prints = [p for b in batches for p in _fingerprints(model.module, b.kwargs)]
        return cls(inputs, answers, prints)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Witness) and all(
            len(a) == len(b) and all(identical(x, y) for x, y in zip(a, b))
            for a, b in ((self.inputs, other.inputs), (self.answers, other.answers),
                         (self.prints, other.prints)))


def identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
            and torch.equal(a, b))


@torch.no_grad()
def _fingerprints(module: nn.Module, kwargs: dict[str, Any]) -> list[torch.Tensor]:
    """One forward; each module's output tensor, fingerprinted (:func:`fingerprint`): every
    position of every module, and the logits at the last position (all a built-in metric
    reads; the unembedding of the other positions would be most of the cost at a real
    vocabulary)."""
    prints: list[torch.Tensor] = []

    def keep(mod: nn.Module, args: tuple, output: Any) -> None:
        x = first_tensor(output)
        if isinstance(x, torch.Tensor) and x.dim() >= 1 and x.numel():
            prints.append(fingerprint(x.detach()))

    params = inspect.signature(module.forward).parameters
    if "use_cache" in params:
        kwargs = {**kwargs, "use_cache": False}
    if "logits_to_keep" in params:   # the built-in metrics read the last position's logits;
        kwargs = {**kwargs, "logits_to_keep": 1}   # every earlier output is kept in full
    with HookSession() as session:
        for m in module.modules():
            session.post(m, keep)
        module(**kwargs)
    return prints


def fingerprint(x: torch.Tensor) -> torch.Tensor:
    """``x``'s bits along its last dimension, each read as an integer times a fixed odd
    weight of its place, summed with wrap-around: one integer per row. A change of any one
    value always changes its row's number (an odd weight is invertible modulo a power of
    two); several changes almost surely do. Exact whatever order the sum takes.

    >>> x = torch.randn(2, 3, 8)
    >>> torch.equal(fingerprint(x), fingerprint(x.clone()))
    True
    >>> y = x.clone(); y[1, 2, 5] = y[1, 2, 5].nextafter(torch.tensor(9.))
    >>> (fingerprint(x) != fingerprint(y)).sum().item()
    1
    """
    if x.dtype.is_complex:
        x = torch.view_as_real(x).flatten(-2)
    if x.dtype == torch.bool:
        x = x.to(torch.int8)
    ints = x.view(_INT_OF_WIDTH[x.element_size()])
    if ints.element_size() < 4:
        ints = ints.to(torch.int32)
    weights = _place_weights(x.device)[:x.shape[-1]].to(ints.dtype)
    while weights.numel() < x.shape[-1]:       # wider than a chunk: repeat, shifted
        weights = torch.cat([weights, weights[:x.shape[-1] - weights.numel()] + 2])
    return (ints * weights).sum(-1, dtype=ints.dtype)


# -- the cheap checks -----------------------------------------------------------------------

def reusable(module: nn.Module) -> bool:
    """No autograd-free guarantee can cover a hook, a training-mode module or a forward
    replaced on an instance: such a model always runs. An edit's hooks (``ii.edit``) are
    part of the model: :func:`model_state` keys the edit set, and the witness's forward
    runs them."""
    from torch.nn.modules import module as torch_module

    if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
        return False
    return not any(m.training or _foreign(m._forward_hooks) or _foreign(m._forward_pre_hooks)
                   or "forward" in m.__dict__ for m in module.modules())


def _foreign(hooks: dict[int, Any]) -> bool:
    return any(not is_edit_hook(fn) for fn in hooks.values())


def model_state(module: nn.Module) -> tuple:
    """Storage, shape, dtype, device, version and an order-sensitive checksum of the bits of
    each parameter and buffer; the module tree with each module's class and forward; the
    attention implementation of each config; the model's edits (each edit set is another
    model)."""
    tensors = [*module.named_parameters(remove_duplicate=False),
               *module.named_buffers(remove_duplicate=False)]
    weights = tuple((name, t.data_ptr(), tuple(t.shape), t.dtype, str(t.device), t._version,
                     checksum(t)) for name, t in tensors)
    tree = tuple((name, type(m), id(m), type(m).forward) for name, m in module.named_modules())
    configs = tuple(sorted({(n, getattr(m.config, "_attn_implementation", None))
                            for n, m in module.named_modules() if hasattr(m, "config")},
                           key=str))
    return weights, tree, configs, edit_keys(module)


def torch_settings() -> tuple:
    cuda = torch.backends.cuda.matmul
    return (torch.get_default_dtype(), torch.get_float32_matmul_precision(),
            torch.are_deterministic_algorithms_enabled(), cuda.allow_tf32,
            cuda.allow_fp16_reduced_precision_reduction,
            cuda.allow_bf16_reduced_precision_reduction, torch.backends.cudnn.allow_tf32)


_INT_OF_WIDTH = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_CHUNK = 1 << 20
_WEIGHTS: dict[str, torch.Tensor] = {}


def checksum(t: torch.Tensor) -> int | None:
    """An order-sensitive checksum of a tensor's bits (:func:`fingerprint` of each chunk of
    its values, combined), so a permutation of the values changes it; None where there are
    no bits (meta tensors).

    >>> w = torch.arange(6.)
    >>> checksum(w) == checksum(w.flip(0))
    False
    """
    if t.device.type == "meta" or t.numel() == 0:
        return None
    total = 0
    for chunk in t.detach().reshape(-1).split(_CHUNK):   # detached views: no grad-mode change
        total = (total * 1_000_003 + int(fingerprint(chunk))) % (1 << 61)
    return total


def _place_weights(device: torch.device) -> torch.Tensor:
    key = str(device)
    if key not in _WEIGHTS:
        gen = torch.Generator().manual_seed(27)
        odd = torch.randint(-(1 << 62), 1 << 62, (_CHUNK,), generator=gen, dtype=torch.int64) | 1
        _WEIGHTS[key] = odd.to(device)
    return _WEIGHTS[key]
