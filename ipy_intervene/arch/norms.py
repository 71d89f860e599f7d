"""What a norm computes, as a linear map once its scale is frozen: ``(x - mean?) / scale *
weight + bias``. Families differ (a LayerNorm centres and has a bias; an RMSNorm does not;
Gemma's RMSNorm multiplies by ``1 + weight``; Cohere's LayerNorm centres without a bias; OLMo's
has no weight), so the form is read off the norm's parameters and proven on a real input and
output of the norm, never assumed from its class.

>>> import torch
>>> norm = torch.nn.LayerNorm(4)
>>> x = torch.randn(4, dtype=torch.float64)
>>> form = norm_form(norm, x, norm(x.float()).double())
>>> form.centres, form.eps
(True, 1e-05)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from ipy_intervene.errors import SiteError

_EPS_NAMES = ("eps", "variance_epsilon", "epsilon", "layer_norm_eps")
_DEFAULT_EPS = (1e-5, 1e-6, 1e-8)


@dataclass(frozen=True)
class NormForm:
    """``y = (x - mean(x) if centres else x) / sqrt(spread(x) + eps) * weight + bias``; weight
    and bias float64 on the CPU (None: 1 and 0)."""

    centres: bool
    eps: float
    weight: torch.Tensor | None
    bias: torch.Tensor | None

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        """The norm's divisor for ``x`` (``[..., d]`` -> ``[..., 1]``)."""
        spread = x.var(-1, unbiased=False, keepdim=True) if self.centres else \
            x.pow(2).mean(-1, keepdim=True)
        return (spread + self.eps).sqrt()

    def linear(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """``x`` through the norm with ``scale`` given and no bias: linear in ``x``."""
        if self.centres:
            x = x - x.mean(-1, keepdim=True)
        x = x / scale
        return x * self.weight if self.weight is not None else x

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear(x, self.scale(x))
        return out + self.bias if self.bias is not None else out

    def frozen(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """The norm's output for ``x`` with its divisor held at ``scale`` (``[..., 1]``, from
        :meth:`scale` on the recorded input): linear in ``x`` plus the bias, computed in
        float64 on ``x``'s device (float32 where the device has no float64) and returned in
        ``x``'s dtype. The frozen norm of an attribution graph or a frozen-scale analysis.

        >>> form = NormForm(False, 1e-6, torch.tensor([2.0, 2.0]), None)
        >>> form.frozen(torch.tensor([3.0, 4.0]), torch.tensor([5.0]))
        tensor([1.2000, 1.6000])
        """
        wide = torch.float32 if x.device.type == "mps" else torch.float64
        h = x.to(wide)
        if self.centres:
            h = h - h.mean(-1, keepdim=True)
        h = h / scale.to(device=x.device, dtype=wide)
        if self.weight is not None:
            h = h * self.weight.to(device=x.device, dtype=wide)
        if self.bias is not None:
            h = h + self.bias.to(device=x.device, dtype=wide)
        return h.to(x.dtype)


def norm_form(norm: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
              rtol: float = 1e-3, name: str = "the final norm") -> NormForm:
    """The form of ``norm`` that maps its real input ``x`` to its real output ``y`` (float64
    vectors ``[d]`` or ``[..., d]``) to within ``rtol`` of ``y``'s size; a :class:`SiteError`
    naming the norm (``name``: where it sits) when none of the known forms does."""
    x, y = x.detach().double().cpu(), y.detach().double().cpu()
    for form in _forms(norm, name):
        got = form(x)
        if got.shape == y.shape and float((got - y).norm()) <= rtol * float(y.norm()) + 1e-6:
            return form
    raise SiteError(f"{name} is a {type(norm).__name__} that computes none of the forms "
                    "ipy_intervene knows (LayerNorm, RMSNorm, with weight or 1 + weight, with "
                    "or without a bias) on this input, so its frozen scale would be wrong")


def _forms(norm: nn.Module, name: str) -> Iterator[NormForm]:
    as64 = lambda t: None if t is None else t.detach().double().cpu()  # noqa: E731
    if any(getattr(getattr(norm, p, None), "is_meta", False) for p in ("weight", "bias")):
        raise SiteError(f"{name}'s weights are offloaded (on `meta`); load the model "
                        "without disk/CPU offload to read them")
    weight, bias = as64(getattr(norm, "weight", None)), as64(getattr(norm, "bias", None))
    stated = next((float(getattr(norm, n)) for n in _EPS_NAMES
                   if isinstance(getattr(norm, n, None), (int, float))), None)
    epsilons = (stated,) if stated is not None else _DEFAULT_EPS
    weights = [weight, None if weight is None else 1.0 + weight] if weight is not None else [None]
    centres_first = isinstance(norm, nn.LayerNorm) or "layernorm" in type(norm).__name__.lower()
    for centres in (centres_first, not centres_first):
        for eps in epsilons:
            for w in weights:
                yield NormForm(centres, eps, w, bias)
                if bias is not None:
                    yield NormForm(centres, eps, w, None)
