"""SAELens's on-disk format, read and written locally: a folder with ``cfg.json`` and
``sae_weights.safetensors`` (``W_enc [d_in, d_sae]``, ``b_enc``, ``W_dec [d_sae, d_in]``,
``b_dec``, and ``threshold`` for JumpReLU). Nothing is downloaded.

>>> sae = ii.load_sae("demo")                       # the SAE shipped with the demo model
>>> sae = ii.load_sae("/path/to/saelens/folder")    # doctest: +SKIP
>>> save_sae(sae, tmp_path / "copy")                # doctest: +SKIP
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ipy_intervene.errors import InputError
from ipy_intervene.features.sae import SAE

CFG, WEIGHTS = "cfg.json", "sae_weights.safetensors"
DEMO_SAE = Path(__file__).resolve().parent.parent / "demo" / "sae"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float64": torch.float64}
ARCHITECTURES = {"standard": "relu", "relu": "relu", "jumprelu": "jumprelu", "topk": "topk"}


def load_sae(where: str | Path, *, device: str | torch.device | None = None) -> SAE:
    """An SAE from a local SAELens folder (``"demo"``: the one shipped with the demo model).

    Architectures ``standard`` (ReLU), ``jumprelu`` and ``topk``; ``normalize_activations``
    must be ``"none"`` (others change the site's values in ways a splice would not match).
    The folder's ``cfg.json`` is kept as ``sae.cfg``.
    """
    folder = DEMO_SAE if str(where) == "demo" else Path(where).expanduser()
    if not folder.is_dir():
        raise InputError(f"no SAE folder at {str(where)!r}: load_sae reads a local folder with "
                         f"{CFG} and {WEIGHTS} (SAELens's format), or 'demo'; nothing is "
                         "downloaded")
    missing = [name for name in (CFG, WEIGHTS) if not (folder / name).is_file()]
    if missing:
        raise InputError(f"{folder} has no {' and no '.join(missing)}: an SAELens folder holds "
                         f"{CFG} and {WEIGHTS}")
    cfg = _read_cfg(folder / CFG)
    sae = _build(cfg, folder)
    _load_weights(sae, folder / WEIGHTS, cfg)
    sae.cfg = cfg
    return sae.to(device) if device is not None else sae


def save_sae(sae: SAE, folder: str | Path, **meta: Any) -> Path:
    """Write ``sae`` as an SAELens folder (``meta``: e.g. ``hook_name``, ``model_name``).

    >>> save_sae(sae, "my_sae", hook_name="transformer.h[2]")   # doctest: +SKIP
    PosixPath('my_sae')
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arch = {"relu": "standard"}.get(sae.activation, sae.activation)
    dtype = next(k for k, v in DTYPES.items() if v == sae.W_enc.dtype)
    cfg = {"architecture": arch, "d_in": sae.d_in, "d_sae": sae.d_sae, "dtype": dtype,
           "apply_b_dec_to_input": sae.apply_b_dec_to_input, "normalize_activations": "none",
           "metadata": dict(meta)}
    if sae.activation == "topk":
        cfg["k"] = sae.k
    if sae.d_out != sae.d_in:
        cfg["d_out"] = sae.d_out
    state = {k: v.detach().contiguous().cpu() for k, v in sae.state_dict().items()}
    save_file(state, str(folder / WEIGHTS))
    (folder / CFG).write_text(json.dumps(cfg, indent=2) + "\n")
    return folder


def _read_cfg(path: Path) -> dict[str, Any]:
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{path} is not readable JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise InputError(f"{path} holds {type(cfg).__name__}, not a JSON object")
    for key in ("d_in", "d_sae"):
        if not isinstance(cfg.get(key), int):
            raise InputError(f"{path}: `{key}` is missing or not an int ({cfg.get(key)!r})")
    norm = cfg.get("normalize_activations") or "none"
    if norm != "none":
        raise InputError(f"{path}: normalize_activations={norm!r} is not supported; fold the "
                         "scaling into the weights (SAELens: fold_activation_norm_scaling_"
                         "factor) and save with normalize_activations='none'")
    return cfg


def _architecture(cfg: dict[str, Any]) -> str:
    arch = cfg.get("architecture")
    if arch is None:  # older SAELens: the activation function names it
        arch = cfg.get("activation_fn_str", "relu")
    if arch not in ARCHITECTURES:
        raise InputError(f"SAE architecture {arch!r} is not supported; supported: "
                         f"{', '.join(sorted(set(ARCHITECTURES)))}")
    return ARCHITECTURES[arch]


def _build(cfg: dict[str, Any], folder: Path) -> SAE:
    activation = _architecture(cfg)
    k = cfg.get("k", (cfg.get("activation_fn_kwargs") or {}).get("k"))
    dtype = DTYPES.get(str(cfg.get("dtype", "float32")).removeprefix("torch."))
    if dtype is None:
        raise InputError(f"{folder / CFG}: dtype {cfg.get('dtype')!r} is not one of "
                         f"{', '.join(DTYPES)}")
    return SAE(cfg["d_in"], cfg["d_sae"], activation=activation, k=k, dtype=dtype,
               apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)),
               d_out=cfg.get("d_out"))


def _load_weights(sae: SAE, path: Path, cfg: dict[str, Any]) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise InputError(f"{path} is not a readable safetensors file ({exc})") from None
    if sae.activation == "jumprelu" and "threshold" not in state and "log_threshold" in state:
        state["threshold"] = state.pop("log_threshold").exp()
    expected = sae.state_dict()
    missing = sorted(set(expected) - set(state))
    if missing:
        raise InputError(f"{path} lacks {', '.join(missing)} for a {cfg.get('architecture', 'standard')} SAE")
    for name, want in expected.items():
        if tuple(state[name].shape) != tuple(want.shape):
            raise InputError(f"{path}: {name} has shape {list(state[name].shape)}; cfg.json "
                             f"(d_in={sae.d_in}, d_sae={sae.d_sae}) needs {list(want.shape)}")
    sae.load_state_dict({k: state[k].to(want.dtype) for k, want in expected.items()})
