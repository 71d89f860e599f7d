"""A sparse autoencoder as a dictionary to splice: ``encode``/``decode`` with SAELens's
parameter names (``W_enc [d_in, d_sae]``, ``b_enc``, ``W_dec [d_sae, d_in]``, ``b_dec``,
``threshold`` for JumpReLU), so a folder SAELens wrote loads as it is (:mod:`.saelens`).
A transcoder is the same module read at a module's input (``d_out`` its output width,
``apply_b_dec_to_input=False``), spliced with ``kind="transcoder"``.

>>> sae = SAE(d_in=128, d_sae=512)
>>> sae.encode(torch.zeros(2, 5, 128)).shape
torch.Size([2, 5, 512])
"""

from __future__ import annotations

import torch
from torch import nn

from ipy_intervene.errors import InputError

ACTIVATIONS = ("relu", "jumprelu", "topk")


class SAE(nn.Module):
    """``encode(x) = act((x - b_dec) @ W_enc + b_enc)`` (``x @ W_enc + b_enc`` when
    ``apply_b_dec_to_input`` is False), ``decode(f) = f @ W_dec + b_dec``.

    ``activation``: ``"relu"``, ``"jumprelu"`` (``relu(pre) * (pre > threshold)``, ``threshold``
    a parameter per latent) or ``"topk"`` (the ``k`` largest of ``relu(pre)`` kept).
    """

    def __init__(self, d_in: int, d_sae: int, *, activation: str = "relu",
                 apply_b_dec_to_input: bool = True, k: int | None = None,
                 d_out: int | None = None, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise InputError(f"activation={activation!r}: expected one of "
                             f"{', '.join(map(repr, ACTIVATIONS))}")
        if activation == "topk" and (not isinstance(k, int) or isinstance(k, bool)
                                     or not 0 < k <= d_sae):
            raise InputError(f"a top-k SAE needs k between 1 and d_sae={d_sae}; got k={k!r}")
        d_out = d_in if d_out is None else d_out
        if apply_b_dec_to_input and d_out != d_in:
            raise InputError(f"d_out={d_out} differs from d_in={d_in} (a transcoder): b_dec "
                             "cannot be subtracted from the input; pass "
                             "apply_b_dec_to_input=False")
        self.d_in, self.d_sae, self.d_out = d_in, d_sae, d_out
        self.activation, self.k = activation, k
        self.apply_b_dec_to_input = apply_b_dec_to_input
        self.W_enc = nn.Parameter(torch.zeros(d_in, d_sae, dtype=dtype))
        self.b_enc = nn.Parameter(torch.zeros(d_sae, dtype=dtype))
        self.W_dec = nn.Parameter(torch.zeros(d_sae, d_out, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(d_out, dtype=dtype))
        if activation == "jumprelu":
            self.threshold = nn.Parameter(torch.zeros(d_sae, dtype=dtype))

    def extra_repr(self) -> str:
        k = f", k={self.k}" if self.activation == "topk" else ""
        out = f", d_out={self.d_out}" if self.d_out != self.d_in else ""
        return f"d_in={self.d_in}, d_sae={self.d_sae}{out}, activation={self.activation!r}{k}"

    def pre_activation(self, x: torch.Tensor) -> torch.Tensor:
        """``(x - b_dec) @ W_enc + b_enc`` ``[..., d_sae]``."""
        if x.shape[-1] != self.d_in:
            raise InputError(f"this SAE reads vectors of width d_in={self.d_in}; got a tensor "
                             f"of shape {list(x.shape)}")
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latent activations ``[..., d_sae]`` of ``x [..., d_in]``."""
        pre = self.pre_activation(x)
        if self.activation == "jumprelu":
            return torch.relu(pre) * (pre > self.threshold)
        acts = torch.relu(pre)
        if self.activation == "topk":
            top = acts.topk(self.k, dim=-1)
            acts = torch.zeros_like(acts).scatter(-1, top.indices, top.values)
        return acts

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """The reconstruction ``[..., d_out]`` of latents ``[..., d_sae]``."""
        return latents @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The reconstruction of ``x``: ``decode(encode(x))``."""
        return self.decode(self.encode(x))
