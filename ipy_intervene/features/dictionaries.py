"""Custom sites as dictionaries: a direction, a subspace, a set of neurons, or any pair of
functions, each with ``encode``/``decode`` so it splices like an SAE (:mod:`.splice`) and
its coordinates are a site of traces and sweeps.

>>> d = Direction(torch.tensor([3.0, 4.0]))
>>> d.encode(torch.tensor([[1.0, 1.0]]))          # the coordinate along the unit direction
tensor([[1.4000]])
>>> ii.attach(model, model.transformer.h[2], Direction(v), name="dir")   # doctest: +SKIP

Since ``error = x - decode(encode(x))``, the spliced output is
``x + decode(new) - decode(old)``: only the part of ``x`` the dictionary spans changes (the
component along the direction, the projection on the subspace, the chosen neurons).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from ipy_intervene.errors import InputError


class Direction(nn.Module):
    """One direction ``v`` (normalised): ``encode(x) = x @ v_hat`` ``[..., 1]``,
    ``decode(c) = c * v_hat``."""

    def __init__(self, v: torch.Tensor) -> None:
        super().__init__()
        v = torch.as_tensor(v).detach()  # a weight row: its value, not its graph
        if v.dim() != 1 or not v.is_floating_point():
            raise InputError(f"a direction is a 1-d float tensor; got {v.dim()}-d {v.dtype}")
        norm = v.norm()
        if not torch.isfinite(norm) or float(norm) == 0:
            raise InputError("the direction has norm 0 (or is not finite): nothing to project on")
        self.register_buffer("v", v / norm)
        self.d_in = v.shape[0]

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}"

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        _width(x, self.d_in, "direction")
        return (x @ self.v).unsqueeze(-1)

    def decode(self, c: torch.Tensor) -> torch.Tensor:
        return c * self.v


class Subspace(nn.Module):
    """The span of ``basis`` rows ``[k, d]`` (orthonormalised, in the rows' order):
    ``encode(x)`` are the ``k`` coordinates, ``decode(c) = c @ Q``."""

    def __init__(self, basis: torch.Tensor) -> None:
        super().__init__()
        basis = torch.as_tensor(basis).detach()
        if basis.dim() != 2 or not basis.is_floating_point():
            raise InputError(f"a subspace basis is a 2-d float tensor [k, d]; got "
                             f"{basis.dim()}-d {basis.dtype}")
        k, d = basis.shape
        if k > d:
            raise InputError(f"{k} basis vectors in {d} dimensions: at most {d}")
        q, r = torch.linalg.qr(basis.double().T)
        if bool((r.diagonal().abs() < 1e-8 * basis.double().norm()).any()):
            raise InputError("the basis vectors are linearly dependent; give independent rows")
        self.register_buffer("Q", (q.T * torch.sign(r.diagonal())[:, None]).to(basis.dtype))
        self.d_in, self.k = d, k

    def extra_repr(self) -> str:
        return f"k={self.k}, d_in={self.d_in}"

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        _width(x, self.d_in, "subspace")
        return x @ self.Q.T

    def decode(self, c: torch.Tensor) -> torch.Tensor:
        return c @ self.Q


class Neurons(nn.Module):
    """Chosen coordinates ``indices`` of a ``d_in``-wide activation: ``encode(x) =
    x[..., indices]``; ``decode`` puts them back in place with zeros elsewhere, so writing a
    latent sets that neuron exactly and the others are untouched."""

    def __init__(self, indices: Sequence[int], d_in: int) -> None:
        super().__init__()
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        if idx.numel() == 0 or idx.dim() != 1:
            raise InputError("Neurons needs a non-empty list of neuron indices")
        if int(idx.min()) < 0 or int(idx.max()) >= d_in:
            raise InputError(f"neuron indices must be in 0..{d_in - 1}; got {idx.tolist()}")
        if len(set(idx.tolist())) != idx.numel():
            raise InputError(f"neuron indices repeat: {idx.tolist()}")
        self.register_buffer("indices", idx)
        self.d_in = d_in

    def extra_repr(self) -> str:
        return f"indices={self.indices.tolist()}, d_in={self.d_in}"

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        _width(x, self.d_in, "neuron set")
        return x[..., self.indices]

    def decode(self, c: torch.Tensor) -> torch.Tensor:
        out = c.new_zeros(*c.shape[:-1], self.d_in)
        out[..., self.indices] = c
        return out


class Custom(nn.Module):
    """Any pair of functions as a dictionary: ``encode(x) -> latents``,
    ``decode(latents) -> x_hat`` (a projection, a probe and its inverse...).

    >>> site = Custom(lambda x: x[..., :4] * 2, lambda c: F.pad(c / 2, (0, 124)))  # doctest: +SKIP
    """

    def __init__(self, encode: Callable[[torch.Tensor], torch.Tensor],
                 decode: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        if not callable(encode) or not callable(decode):
            raise InputError("Custom(encode, decode) takes two functions")
        self._encode, self._decode = encode, decode

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self._encode(x)

    def decode(self, c: torch.Tensor) -> torch.Tensor:
        return self._decode(c)


def _width(x: torch.Tensor, width: int, what: str) -> None:
    if x.shape[-1] != width:
        raise InputError(f"this {what} lives in {width} dimensions; the site's value has shape "
                         f"{list(x.shape)}")
