"""Sets of per-layer transcoders (one per MLP: reads the MLP's input, writes its output), from
local folders: SAELens transcoder folders (``cfg.json`` with ``architecture`` ``transcoder``
or ``jumprelu_transcoder``), the Gemma Scope layout (``params.npz`` with ``W_enc``, ``W_dec``,
``b_enc``, ``b_dec``, ``threshold``), or the ones shipped with the demo model; and cross-layer transcoders in circuit-tracer's
folder layout (:func:`load_clt`).

>>> tcs = ii.load_transcoders("demo")                 # {0: SAE(...), 1: ..., 2: ..., 3: ...}
>>> tcs = ii.load_transcoders("/data/gemma-scope-transcoders")      # doctest: +SKIP

A folder of a set holds one subfolder per layer, named ``layer_<n>`` (``layer_0``,
``layer_1``...); a Gemma Scope layer folder may nest ``width_<w>/average_l0_<n>/`` as on the
hub, and must then hold exactly one ``params.npz`` (else pass that folder). Nothing is
downloaded, and anything the loader does not understand is an error naming it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ipy_intervene.errors import InputError
from ipy_intervene.features.clt import (CrossLayerTranscoder, Replacement, TranscoderSet,
                                       load_clt)
from ipy_intervene.features.sae import SAE
from ipy_intervene.features.saelens import CFG, WEIGHTS, load_sae

DEMO_TRANSCODERS = Path(__file__).resolve().parent.parent / "demo" / "transcoders"
GEMMA_SCOPE = "params.npz"
GEMMA_SCOPE_KEYS = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")
LAYER_DIR = re.compile(r"layer_(\d+)$")


def load_transcoders(where: str | Path, *, device: str | torch.device | None = None
                     ) -> dict[int, SAE]:
    """Transcoders by layer from a local folder (``"demo"``: the demo model's, one per MLP).

    >>> sorted(ii.load_transcoders("demo"))
    [0, 1, 2, 3]
    """
    folder = DEMO_TRANSCODERS if str(where) == "demo" else Path(where).expanduser()
    if not folder.is_dir():
        raise InputError(f"no transcoder folder at {str(where)!r}: load_transcoders reads a "
                         "local folder with one layer_<n> subfolder per layer, or 'demo'; "
                         "nothing is downloaded")
    layers = {int(m.group(1)): p for p in folder.iterdir()
              if p.is_dir() and (m := LAYER_DIR.match(p.name))}
    if not layers:
        raise InputError(f"{folder} has no layer_<n> subfolders (layer_0, layer_1...): each "
                         "holds one layer's transcoder (an SAELens folder or Gemma Scope's "
                         f"{GEMMA_SCOPE})")
    return {layer: load_transcoder(layers[layer], device=device) for layer in sorted(layers)}


def load_transcoder(folder: str | Path, *, device: str | torch.device | None = None) -> SAE:
    """One transcoder: an SAELens transcoder folder or a Gemma Scope ``params.npz`` folder."""
    folder = Path(folder)
    if (folder / CFG).is_file():
        tc = load_sae(folder, device=device)
        if tc.apply_b_dec_to_input:
            raise InputError(f"{folder / CFG}: an SAE, not a transcoder (it subtracts b_dec "
                             "from its input); a transcoder's cfg.json says `architecture` "
                             "'transcoder' or 'jumprelu_transcoder'")
        return tc
    found = sorted(folder.rglob(GEMMA_SCOPE))
    if len(found) != 1:
        what = "no" if not found else f"{len(found)}"
        raise InputError(f"{folder} holds {what} {GEMMA_SCOPE} files and no {CFG}: a "
                         f"transcoder folder holds an SAELens {CFG} + {WEIGHTS}, or exactly "
                         f"one Gemma Scope {GEMMA_SCOPE}" +
                         ("; pass the folder of the one you mean" if found else ""))
    tc = load_gemma_scope(found[0])
    return tc.to(device) if device is not None else tc


def load_gemma_scope(path: str | Path) -> SAE:
    """A JumpReLU transcoder from Gemma Scope's ``params.npz``: ``W_enc [d_in, d_sae]``,
    ``W_dec [d_sae, d_out]``, ``b_enc``, ``b_dec``, ``threshold``; any other array (an affine
    skip connection ``W_skip``...) is an error, never dropped."""
    import numpy as np

    path = Path(path)
    try:
        with np.load(path) as data:
            arrays = {key: torch.from_numpy(np.array(data[key])) for key in data.files}
    except (OSError, ValueError) as exc:
        raise InputError(f"{path} is not a readable .npz file ({exc})") from None
    extra = sorted(set(arrays) - set(GEMMA_SCOPE_KEYS))
    if extra:
        raise InputError(f"{path} holds {', '.join(extra)}, which the Gemma Scope transcoder "
                         f"layout ({', '.join(GEMMA_SCOPE_KEYS)}) does not have: not "
                         "implemented, so not loaded")
    missing = [key for key in GEMMA_SCOPE_KEYS if key not in arrays]
    if missing:
        raise InputError(f"{path} lacks {', '.join(missing)} (a Gemma Scope transcoder holds "
                         f"{', '.join(GEMMA_SCOPE_KEYS)})")
    w_enc, w_dec = arrays["W_enc"], arrays["W_dec"]
    if w_enc.dim() != 2 or w_dec.dim() != 2 or w_enc.shape[1] != w_dec.shape[0]:
        raise InputError(f"{path}: W_enc {list(w_enc.shape)} and W_dec {list(w_dec.shape)} "
                         "are not [d_in, d_sae] and [d_sae, d_out]")
    d_in, d_sae, d_out = w_enc.shape[0], w_enc.shape[1], w_dec.shape[1]
    tc = SAE(d_in, d_sae, d_out=d_out, activation="jumprelu", apply_b_dec_to_input=False,
             dtype=w_enc.dtype if w_enc.is_floating_point() else torch.float32)
    want = {"b_enc": [d_sae], "b_dec": [d_out], "threshold": [d_sae]}
    for key, shape in want.items():
        if list(arrays[key].shape) != shape:
            raise InputError(f"{path}: {key} has shape {list(arrays[key].shape)}; W_enc and "
                             f"W_dec need {shape}")
    tc.load_state_dict({k: arrays[k].to(tc.W_enc.dtype) for k in GEMMA_SCOPE_KEYS})
    return tc


def check_transcoders(transcoders: Any, n_layers: int, d_model: int, what: str
                      ) -> dict[int, SAE]:
    """``transcoders`` (a dict by layer, a list with one per layer, a folder or ``"demo"``)
    as a dict ``{layer: SAE}`` with one per layer of ``what`` (the model: n_layers, d_model),
    each reading and writing ``d_model`` wide vectors; anything else is an InputError."""
    if isinstance(transcoders, (str, Path)):
        transcoders = load_transcoders(transcoders)
    if isinstance(transcoders, Sequence):
        transcoders = dict(enumerate(transcoders))
    if not isinstance(transcoders, Mapping):
        raise InputError(f"transcoders= is a dict {{layer: transcoder}}, a list with one per "
                         f"layer, a folder or 'demo'; got {type(transcoders).__name__}")
    bad = [k for k in transcoders if not isinstance(k, int) or not 0 <= k < n_layers]
    if bad:
        raise InputError(f"transcoders for layer {bad[0]!r}: {what} has layers 0 to "
                         f"{n_layers - 1}")
    missing = [k for k in range(n_layers) if k not in transcoders]
    if missing:
        raise InputError(f"no transcoder for layer {', '.join(map(str, missing))} of {what}: "
                         "the replacement model replaces every MLP (give one per layer)")
    out = {}
    for layer in range(n_layers):
        tc = transcoders[layer]
        for name in ("encode", "decode", "W_enc", "W_dec", "b_enc", "b_dec"):
            if not hasattr(tc, name):
                raise InputError(f"the transcoder for layer {layer} ({type(tc).__name__}) has "
                                 f"no `{name}`; expected an ii.SAE (encode, decode, W_enc "
                                 "[d_in, d_sae], W_dec [d_sae, d_out], b_enc, b_dec)")
        d_in, d_out = tc.W_enc.shape[0], tc.W_dec.shape[1]
        if (d_in, d_out) != (d_model, d_model):
            raise InputError(f"the transcoder for layer {layer} reads width {d_in} and writes "
                             f"width {d_out}; {what}'s MLP reads and writes width {d_model}")
        if getattr(tc, "apply_b_dec_to_input", False):
            raise InputError(f"the transcoder for layer {layer} subtracts b_dec from its "
                             "input (an SAE, apply_b_dec_to_input=True); a transcoder reads "
                             "the MLP's input as it is")
        out[layer] = tc
    return out


def check_replacement(transcoders: Any, n_layers: int, d_model: int, what: str
                      ) -> Replacement:
    """What replaces the MLPs of ``what``: a :class:`CrossLayerTranscoder` (or a folder in
    circuit-tracer's CLT layout, :func:`load_clt`) checked against the model's layers and
    width, or per-layer transcoders (:func:`check_transcoders`) as a :class:`TranscoderSet`."""
    if isinstance(transcoders, (str, Path)) and str(transcoders) != "demo" and \
            (Path(transcoders).expanduser() / "W_enc_0.safetensors").is_file():
        transcoders = load_clt(transcoders)
    if isinstance(transcoders, TranscoderSet):
        transcoders = transcoders.transcoders
    if not isinstance(transcoders, CrossLayerTranscoder):
        return TranscoderSet(check_transcoders(transcoders, n_layers, d_model, what))
    clt, where = transcoders, getattr(transcoders, "source", "the cross-layer transcoder")
    if clt.n_layers != n_layers:
        raise InputError(f"{where} has {clt.n_layers} layers (W_enc_0 to W_enc_"
                         f"{clt.n_layers - 1}); {what} has {n_layers}: one encoder per layer")
    if clt.d_model != d_model:
        raise InputError(f"{where}: W_enc_0 reads width {clt.d_model}; {what}'s MLPs read "
                         f"and write width {d_model}")
    return clt
