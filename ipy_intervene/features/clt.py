"""Cross-layer transcoders (CLTs, Ameisen et al. 2025) and the one interface the attribution
graph reads every replacement through.

A CLT has one encoder per layer, reading that layer's MLP input, and for each source layer
``s`` one decoder to the MLP output of every layer ``t >= s``: the replacement MLP output at
``t`` is ``sum over s <= t of acts[s] @ W_dec[s][:, t - s] + b_dec[t]``. Per-layer
transcoders are the case with one decoder per source (``t == s``) and are wrapped in
:class:`TranscoderSet`, so the graph code never asks which kind it holds.

>>> clt = CrossLayerTranscoder(n_layers=3, d_model=32, d_sae=64)
>>> clt.decode(2, {0: torch.zeros(5, 64), 1: torch.zeros(5, 64), 2: torch.zeros(5, 64)}).shape
torch.Size([5, 32])

The weights keep circuit-tracer's layout where it fixes one (``W_dec[s]``:
``[d_sae, n_layers - s, d_model]``); the encoders are stored ``[n_layers, d_model, d_sae]``
(SAELens's ``W_enc [d_in, d_sae]`` per layer).

:func:`load_clt` reads circuit-tracer's folder layout: ``W_enc_<l>.safetensors`` holding
``W_enc_<l> [d_sae, d_model]``, ``b_enc_<l> [d_sae]``, ``b_dec_<l> [d_model]`` (the bias of
layer ``l``'s MLP output) and, for JumpReLU, ``threshold_<l> [d_sae]``;
``W_dec_<l>.safetensors`` holding ``W_dec_<l> [d_sae, n_layers - l, d_model]``; and a
``config.yaml`` saying where the features read and write (``feature_input_hook``,
``feature_output_hook``). Anything else is an error naming it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ipy_intervene.errors import InputError
from ipy_intervene.features.sae import SAE

CLT_ACTIVATIONS = ("relu", "jumprelu")


class CrossLayerTranscoder(nn.Module):
    """``encode(l, x) = act(x @ W_enc[l] + b_enc[l])`` (``act``: ReLU, or JumpReLU
    ``relu(pre) * (pre > threshold[l])``); ``decode(t, acts)`` as in the module docstring.

    >>> clt = CrossLayerTranscoder(2, 8, 16, activation="jumprelu")
    >>> clt.decoder(0, 1).shape
    torch.Size([16, 8])
    """

    def __init__(self, n_layers: int, d_model: int, d_sae: int, *, activation: str = "relu",
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if activation not in CLT_ACTIVATIONS:
            raise InputError(f"activation={activation!r}: a cross-layer transcoder here is "
                             f"{' or '.join(map(repr, CLT_ACTIVATIONS))}")
        self.n_layers, self.d_model, self.d_sae = n_layers, d_model, d_sae
        self.activation = activation
        self.W_enc = nn.Parameter(torch.zeros(n_layers, d_model, d_sae, dtype=dtype))
        self.b_enc = nn.Parameter(torch.zeros(n_layers, d_sae, dtype=dtype))
        self.W_dec = nn.ParameterList(
            [nn.Parameter(torch.zeros(d_sae, n_layers - s, d_model, dtype=dtype))
             for s in range(n_layers)])
        self.b_dec = nn.Parameter(torch.zeros(n_layers, d_model, dtype=dtype))
        if activation == "jumprelu":
            self.threshold = nn.Parameter(torch.zeros(n_layers, d_sae, dtype=dtype))

    def extra_repr(self) -> str:
        return (f"n_layers={self.n_layers}, d_model={self.d_model}, d_sae={self.d_sae}, "
                f"activation={self.activation!r}")

    @property
    def dtype(self) -> torch.dtype:
        return self.b_enc.dtype

    def dtype_of(self, layer: int) -> torch.dtype:
        """The dtype layer ``layer``'s encoder computes in (one for all layers)."""
        return self.b_enc.dtype

    def encoder(self, layer: int) -> torch.Tensor:
        """Layer ``layer``'s encoder ``[d_model, d_sae]``."""
        return self.W_enc[layer]

    def enc_bias(self, layer: int) -> torch.Tensor:
        return self.b_enc[layer]

    def pre_activation(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """``x @ W_enc[layer] + b_enc[layer]`` ``[..., d_sae]``."""
        if x.shape[-1] != self.d_model:
            raise InputError(f"this cross-layer transcoder reads width {self.d_model}; got a "
                             f"tensor of shape {list(x.shape)}")
        return x.to(self.dtype) @ self.W_enc[layer] + self.b_enc[layer]

    def encode(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """Layer ``layer``'s feature activations ``[..., d_sae]`` of its MLP input ``x``."""
        pre = self.pre_activation(layer, x)
        if self.activation == "jumprelu":
            return torch.relu(pre) * (pre > self.threshold[layer])
        return torch.relu(pre)

    def targets(self, source: int) -> range:
        """The layers whose MLP output a feature of ``source`` writes to."""
        return range(source, self.n_layers)

    def sources(self, target: int) -> range:
        """The layers whose features write to ``target``'s MLP output."""
        return range(0, target + 1)

    def decoder(self, source: int, target: int) -> torch.Tensor:
        """The decoder ``[d_sae, d_model]`` from ``source``'s features to ``target``'s MLP
        output (``target >= source``)."""
        if not 0 <= source <= target < self.n_layers:
            raise InputError(f"no decoder from layer {source} to layer {target}: a CLT "
                             f"writes from a layer to itself and later layers (0 to "
                             f"{self.n_layers - 1})")
        return self.W_dec[source][:, target - source]

    def decode(self, target: int, acts: Mapping[int, torch.Tensor]) -> torch.Tensor:
        """The replacement MLP output at ``target`` from the activations ``acts[s]``
        ``[..., d_sae]`` of every layer ``s <= target``."""
        out = self.b_dec[target]
        for source in self.sources(target):
            out = out + acts[source].to(self.dtype) @ self.decoder(source, target)
        return out


class TranscoderSet:
    """Per-layer transcoders ``{layer: SAE}`` behind the interface of
    :class:`CrossLayerTranscoder` (one decoder per source: its own layer).

    >>> ts = TranscoderSet({0: SAE(8, 16, apply_b_dec_to_input=False)})
    >>> list(ts.targets(0)), ts.decoder(0, 0).shape
    ([0], torch.Size([16, 8]))
    """

    def __init__(self, transcoders: Mapping[int, SAE]) -> None:
        self.transcoders = dict(transcoders)
        self.n_layers = len(self.transcoders)

    def __getitem__(self, layer: int) -> SAE:
        return self.transcoders[layer]

    def dtype_of(self, layer: int) -> torch.dtype:
        return self.transcoders[layer].W_enc.dtype

    def encoder(self, layer: int) -> torch.Tensor:
        return self.transcoders[layer].W_enc

    def enc_bias(self, layer: int) -> torch.Tensor:
        return self.transcoders[layer].b_enc

    def pre_activation(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        tc = self.transcoders[layer]
        return tc.pre_activation(x.to(tc.W_enc.dtype))

    def encode(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        tc = self.transcoders[layer]
        return tc.encode(x.to(tc.W_enc.dtype))

    def targets(self, source: int) -> range:
        return range(source, source + 1)

    def sources(self, target: int) -> range:
        return range(target, target + 1)

    def decoder(self, source: int, target: int) -> torch.Tensor:
        if source != target:
            raise InputError(f"no decoder from layer {source} to layer {target}: a per-layer "
                             "transcoder writes its own layer's MLP output only")
        return self.transcoders[source].W_dec

    def decode(self, target: int, acts: Mapping[int, torch.Tensor]) -> torch.Tensor:
        tc = self.transcoders[target]
        return tc.decode(acts[target].to(tc.W_enc.dtype))


Replacement = CrossLayerTranscoder | TranscoderSet


# -- circuit-tracer's folder layout -----------------------------------------------------------

CONFIG = "config.yaml"
READS_MLP_IN = ("hook_mlp_in", "mlp.hook_in", "ln2.hook_normalized")
WRITES_MLP_OUT = ("hook_mlp_out", "mlp.hook_out")
CONFIG_KEYS = ("model_name", "model_kind", "feature_input_hook", "feature_output_hook", "scan")
_FILE = re.compile(r"^W_(enc|dec)_(\d+)\.safetensors$")


def load_clt(folder: str | Path, *, reads: str | None = None,
             device: str | torch.device | None = None, dtype: torch.dtype | None = None
             ) -> CrossLayerTranscoder:
    """A cross-layer transcoder from a local folder in circuit-tracer's layout (module
    docstring). Its features must read each MLP's input and write each MLP's output: said by
    ``config.yaml`` (``feature_input_hook: hook_mlp_in``...) or, without one, by
    ``reads="mlp_in"``. ``dtype``: default the files' own.

    >>> clt = load_clt("/data/my-clt", reads="mlp_in")                  # doctest: +SKIP
    >>> ii.attribution_graph(model, prompt, clt)                         # doctest: +SKIP
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise InputError(f"no cross-layer transcoder folder at {str(folder)!r} (nothing is "
                         "downloaded)")
    _check_reads(folder, reads)
    files = _layer_files(folder)
    enc = [_read(files[("enc", i)]) for i in range(len(files) // 2)]
    dec = [_read(files[("dec", i)]) for i in range(len(files) // 2)]
    clt = _assemble(folder, enc, dec, dtype)
    clt.source = str(folder)
    return clt.to(device) if device is not None else clt


def _check_reads(folder: Path, reads: str | None) -> None:
    cfg = _config(folder)
    hook_in = cfg.get("feature_input_hook")
    if cfg.get("model_kind", "cross_layer_transcoder") != "cross_layer_transcoder":
        raise InputError(f"{folder / CONFIG}: model_kind {cfg['model_kind']!r}; load_clt "
                         "reads model_kind cross_layer_transcoder")
    if hook_in is None and reads is None:
        raise InputError(f"{folder} has no {CONFIG} saying what the encoders read; pass "
                         "reads='mlp_in' if they read each MLP's input (the only kind "
                         "implemented)")
    if hook_in is not None and hook_in not in READS_MLP_IN:
        raise InputError(f"{folder / CONFIG}: feature_input_hook {hook_in!r}; these graphs' "
                         f"CLT features read each MLP's input ({', '.join(READS_MLP_IN)}). "
                         "hook_resid_mid (the residual stream before the MLP's norm) is not "
                         "implemented, so not loaded")
    if reads not in (None, "mlp_in"):
        raise InputError(f"reads={reads!r}: only 'mlp_in' (each MLP's input) is implemented")
    hook_out = cfg.get("feature_output_hook", WRITES_MLP_OUT[0])
    if hook_out not in WRITES_MLP_OUT:
        raise InputError(f"{folder / CONFIG}: feature_output_hook {hook_out!r}; a CLT here "
                         f"writes each MLP's output ({', '.join(WRITES_MLP_OUT)})")


def _config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG
    if not path.is_file():
        return {}
    import yaml

    try:
        cfg = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise InputError(f"{path} is not readable YAML ({exc})") from None
    if not isinstance(cfg, dict):
        raise InputError(f"{path}: expected a mapping of {', '.join(CONFIG_KEYS)}")
    extra = sorted(set(map(str, cfg)) - set(CONFIG_KEYS))
    if extra:
        raise InputError(f"{path}: {', '.join(extra)} not understood (known keys: "
                         f"{', '.join(CONFIG_KEYS)}), so not loaded")
    return cfg


def _layer_files(folder: Path) -> dict[tuple[str, int], Path]:
    found: dict[tuple[str, int], Path] = {}
    for path in sorted(folder.iterdir()):
        m = _FILE.match(path.name)
        if m:
            found[(m.group(1), int(m.group(2)))] = path
        elif path.suffix in (".safetensors", ".npz", ".pt", ".bin", ".pth"):
            raise InputError(f"{path}: not part of circuit-tracer's CLT layout "
                             "(W_enc_<l>.safetensors, W_dec_<l>.safetensors), so not loaded")
    n = 1 + max((layer for _, layer in found), default=-1)
    if n == 0:
        raise InputError(f"{folder} holds no W_enc_<l>.safetensors / W_dec_<l>.safetensors")
    for layer in range(n):
        for kind in ("enc", "dec"):
            if (kind, layer) not in found:
                raise InputError(f"{folder} lacks W_{kind}_{layer}.safetensors: a CLT of {n} "
                                 f"layers has W_enc_0..W_enc_{n - 1} and W_dec_0..W_dec_{n - 1}")
    return found


def _read(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise InputError(f"{path} is not a readable safetensors file ({exc})") from None


def _assemble(folder: Path, enc: list[dict], dec: list[dict], dtype: torch.dtype | None
              ) -> CrossLayerTranscoder:
    n = len(enc)
    w0 = _key(folder, enc[0], "enc", 0, "W_enc_0")
    if w0.dim() != 2:
        raise InputError(f"{folder}: W_enc_0 has shape {list(w0.shape)}; expected "
                         "[d_sae, d_model]")
    d_sae, d_model = w0.shape
    jump = "threshold_0" in enc[0]
    dtype = dtype or (w0.dtype if w0.is_floating_point() else torch.float32)
    clt = CrossLayerTranscoder(n, d_model, d_sae, activation="jumprelu" if jump else "relu",
                               dtype=dtype)
    with torch.no_grad():
        for layer in range(n):
            want = {f"W_enc_{layer}": [d_sae, d_model], f"b_enc_{layer}": [d_sae],
                    f"b_dec_{layer}": [d_model]}
            if jump:
                want[f"threshold_{layer}"] = [d_sae]
            got = _checked(folder, enc[layer], "enc", layer, want)
            clt.W_enc[layer].copy_(got[f"W_enc_{layer}"].T)
            clt.b_enc[layer].copy_(got[f"b_enc_{layer}"])
            clt.b_dec[layer].copy_(got[f"b_dec_{layer}"])
            if jump:
                threshold = got[f"threshold_{layer}"]
                if bool((threshold < 0).any()):
                    raise InputError(f"{folder}: threshold_{layer} has negative values; "
                                     "JumpReLU here is relu(pre) * (pre > threshold), which "
                                     "differs from circuit-tracer's below 0, so not loaded")
                clt.threshold[layer].copy_(threshold)
            w = _checked(folder, dec[layer], "dec", layer,
                         {f"W_dec_{layer}": [d_sae, n - layer, d_model]})
            clt.W_dec[layer].copy_(w[f"W_dec_{layer}"])
    return clt.requires_grad_(False)


def _key(folder: Path, tensors: dict, kind: str, layer: int, key: str) -> torch.Tensor:
    if key not in tensors:
        raise InputError(f"{folder / f'W_{kind}_{layer}.safetensors'} lacks {key}")
    return tensors[key]


def _checked(folder: Path, tensors: dict, kind: str, layer: int,
             want: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    path = folder / f"W_{kind}_{layer}.safetensors"
    extra = sorted(set(tensors) - set(want))
    if extra:
        raise InputError(f"{path} holds {', '.join(extra)}, which circuit-tracer's CLT layout "
                         f"does not have here ({', '.join(want)}): not understood, so not "
                         "loaded")
    for key, shape in want.items():
        value = _key(folder, tensors, kind, layer, key)
        if list(value.shape) != shape:
            raise InputError(f"{path}: {key} has shape {list(value.shape)}; expected {shape} "
                             "(from W_enc_0 [d_sae, d_model] and the number of layers)")
    return tensors
