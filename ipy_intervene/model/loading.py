"""Loading a model (``ii.load_model``) and wrapping one already in memory (``ii.wrap``).

Every loading mistake is an :class:`InputError` that names the path or file, says what was
expected and what to do: a folder that does not exist, a weights file given instead of its
folder, a missing shard, a truncated file, no tokenizer files, weights the checkpoint lacks.

>>> import ipy_intervene as ii
>>> model = ii.load_model("demo")
>>> model.config.n_layer, model.module.training
(4, False)
"""

from __future__ import annotations

import difflib
import json
import os
import re
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch
from torch import nn

from ipy_intervene.errors import InputError, InterventionError
from ipy_intervene.model.envoys import DEMO_DIR, Model

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                   "vocab.txt", "spiece.model")
FOLDER_HINT = "ii.load_model takes a folder holding config.json and *.safetensors, or a hub id"
REDO = "download it again, or re-save the model with model.save_pretrained(folder)"


def load_model(name_or_path: str | Path = "demo", *,
               tokenizer: str | Path | PreTrainedTokenizerBase | None = None,
               device_map: Any = None, dtype: torch.dtype | str | None = None,
               trust_remote_code: bool = False, allow_missing_weights: bool = False,
               adapter: Any = None, **kwargs: Any) -> Model:
    """Load a causal LM and its tokenizer as an :class:`ii.Model`.

    ``"demo"`` is the embedded model; otherwise a local folder or a hub id, loaded with
    ``AutoModelForCausalLM`` (safetensors only) and ``AutoTokenizer``. ``tokenizer`` loads the
    tokenizer from elsewhere (a hub id, a folder) or takes a tokenizer object. Weights that
    the checkpoint lacks (or has in another shape, or has and the model does not use) are an
    error unless ``allow_missing_weights=True``, which warns instead. Other keywords go to
    ``from_pretrained`` (``attn_implementation``, ``offload_folder``, ``max_memory``, ...);
    ``adapter=ii.Adapter(...)``: the site map every analysis reads (see :func:`wrap`).

    >>> model = load_model("demo")
    >>> model.config.n_layer
    4
    >>> load_model(folder, tokenizer="gpt2", device_map="auto")    # doctest: +SKIP
    """
    source = DEMO_DIR if str(name_or_path) == "demo" else local_or_hub(name_or_path, "model")
    dtype = _dtype(dtype)
    tok = tokenizer
    if tokenizer is None or isinstance(tokenizer, (str, Path)):
        tok = source if tokenizer is None else local_or_hub(tokenizer, "tokenizer")
        check_tokenizer_files(tok, own=tokenizer is None)  # fail before a long load
    module = _load_module(source, allow_missing_weights, device_map=device_map, dtype=dtype,
                          trust_remote_code=trust_remote_code, **kwargs)
    if isinstance(tok, (str, Path)):
        tok = _load_tokenizer(tok, trust_remote_code, own=tokenizer is None)
    return wrap(Model(module.eval(), tok), adapter=adapter)


# -- where the files are ------------------------------------------------------------------------

def local_or_hub(name_or_path: str | Path, what: str = "model") -> Path | str:
    """A local folder (checked) as a ``Path``, or a hub id as it is.

    A name is local when it is a ``Path``, starts with ``/``, ``.`` or ``~``, is not shaped
    like a hub id (``name`` or ``owner/name``), or its first part exists here.

    >>> local_or_hub("gpt2")
    'gpt2'
    """
    if not looks_local(name_or_path):
        return str(name_or_path)
    path = Path(name_or_path).expanduser()
    if not path.exists():
        raise InputError(f"{path}: no such folder ({_nearest(path)}). {FOLDER_HINT} "
                         f"such as 'gpt2'; check the path for the {what}")
    if path.is_file():
        raise InputError(_file_not_folder(path, what))
    return path


def looks_local(name_or_path: str | Path) -> bool:
    """Whether ``name_or_path`` means a local path rather than a hub id.

    >>> looks_local("openai-community/gpt2"), looks_local("./gpt2"), looks_local("a/b/c")
    (False, True, True)
    """
    if isinstance(name_or_path, Path):
        return True
    text = str(name_or_path)
    if text.startswith((".", "~", "/")) or os.sep in text.replace("/", ""):
        return True
    return not HUB_ID.fullmatch(text) or Path(text.split("/")[0]).exists()


def _nearest(path: Path) -> str:
    """What does exist on the way to ``path``, and a close name there."""
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if parent != path.absolute().parent:
        return f"the nearest folder that exists is {parent}"
    close = difflib.get_close_matches(path.name, os.listdir(parent), n=1)
    found = f"; did you mean {str(parent / close[0])!r}?" if close else ""
    return f"{parent} has no {path.name!r}{found}"


def _file_not_folder(path: Path, what: str) -> str:
    if what != "model":
        return (f"{path} is a file, not a folder: tokenizer= takes a folder holding tokenizer "
                f"files, a hub id or a tokenizer object. Pass tokenizer={str(path.parent)!r}")
    kind = "a weights file" if path.suffix == ".safetensors" else "a file"
    return (f"{path} is {kind}, not a folder: {FOLDER_HINT}. Pass the folder that holds "
            f"config.json and this file: ii.load_model({str(path.parent)!r})")


def diagnose(folder: Path) -> str | None:
    """What is wrong with a model folder that ``from_pretrained`` could not load: no
    config.json, shards its index lists but the folder lacks, or a weights file that
    safetensors cannot open; None when none of these.

    >>> diagnose(Path("/")).split(",")[0]
    '/: no config.json'
    """
    if not (folder / "config.json").exists():
        files = ", ".join(sorted(p.name for p in folder.iterdir())[:8]) or "nothing"
        return (f"{folder}: no config.json, so the model's architecture is unknown (the "
                f"folder holds {files}). {FOLDER_HINT}; point to the folder where "
                "model.save_pretrained wrote config.json")
    for index in sorted(folder.glob("*.safetensors.index.json")):
        try:
            listed = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError):
            return f"{index}: not a shard index (JSON with a 'weight_map'); {REDO}"
        missing = sorted(listed - {p.name for p in folder.iterdir()})
        if missing:
            return (f"{folder}: {index.name} lists {len(missing)} weights file(s) that are not "
                    f"in the folder: {_list(missing)}. The download or copy is incomplete; "
                    "fetch the missing file(s) again")
    return corrupt_file(folder)


def corrupt_file(folder: Path) -> str | None:
    """The message for the first ``model*.safetensors`` in ``folder`` that safetensors cannot
    open (truncated, not a safetensors file), or None when all open."""
    from safetensors import SafetensorError, safe_open

    for file in sorted(folder.glob("model*.safetensors")):
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except (SafetensorError, OSError) as exc:
            return (f"{file}: the weights file is truncated or corrupt ({exc}, "
                    f"{file.stat().st_size} bytes on disk); {REDO}")
    return None


def _list(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


# -- the module ---------------------------------------------------------------------------------

def _load_module(source: Path | str, allow_missing: bool, **kwargs: Any) -> nn.Module:
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    kwargs.pop("output_loading_info", None)
    allow_mismatch = kwargs.pop("ignore_mismatched_sizes", False)
    try:
        with _quiet_progress(source == DEMO_DIR):  # the 3 MB demo loads in an instant: no bar
            module, info = AutoModelForCausalLM.from_pretrained(
                source, use_safetensors=True, output_loading_info=True,
                ignore_mismatched_sizes=True, **kwargs)
    except (OSError, ValueError, SafetensorError) as exc:  # what unreadable files raise
        error = _loading_error(source, exc)
        if error is None:
            raise
        raise error from exc
    check_loading_info(info, source, allow_missing, allow_missing or allow_mismatch)
    return module


def _loading_error(source: Path | str, exc: Exception) -> InputError | None:
    """``exc`` from ``from_pretrained`` as an InputError when we know what went wrong."""
    folder = source if isinstance(source, Path) else _cached_folder(source)
    message = diagnose(folder) if folder is not None else None
    if message is not None:
        return InputError(message)
    if not isinstance(exc, OSError):
        return None
    if "safetensors" in str(exc):
        return InputError(f"{source}: no safetensors weights. ipy_intervene loads safetensors "
                          "only (pickled .bin/.pt files can run code when loaded); convert them "
                          "once where you trust them: model.save_pretrained(folder) writes "
                          "model.safetensors")
    return _hub_error(source, exc) if isinstance(source, str) else None


def _hub_error(name: str, exc: Exception) -> InputError:
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return InputError(f"{name!r} is not a folder here (current folder: {os.getcwd()}), and "
                      f"the Hugging Face hub did not provide it: {reason} If you meant a "
                      f"folder, pass its path (e.g. './{name}'); if you meant a hub model, "
                      "check the name, and without a network download it first where there "
                      "is one (it is then read from the cache)")


def _cached_folder(name: str) -> Path | None:
    """The hub cache's snapshot folder of ``name``, when it has one."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, local_files_only=True))
    except Exception:  # not cached, or not a valid id: nothing to look at
        return None


def check_loading_info(info: dict[str, Any], source: Path | str, allow_missing: bool,
                       allow_mismatch: bool) -> None:
    """Raise (or, when allowed, warn) for weights the checkpoint lacks, has in another shape,
    or has and the model does not use.

    >>> check_loading_info({"missing_keys": ["lm_head.weight"]}, "folder", False, False)
    Traceback (most recent call last):
    ...
    ipy_intervene.errors.InputError: folder: 1 weight(s) of the model are not in the checkpoint...
    """
    missing = sorted(info.get("missing_keys") or [])
    mismatched = sorted(info.get("mismatched_keys") or [])
    unused = sorted(info.get("unexpected_keys") or [])
    errors = [str(e) for e in info.get("error_msgs") or []]
    if errors:
        raise InputError(f"{source}: the weights did not load: {'; '.join(errors)}")
    if missing:
        text = (f"{source}: {len(missing)} weight(s) of the model are not in the checkpoint, "
                f"so they are random: {summarize_names(missing)}. The weights do not match the "
                "model config.json describes (another architecture, or an incomplete file)")
        _refuse_or_warn(text, allow_missing)
    if mismatched:
        shapes = [f"{k} {list(ckpt)} in the checkpoint vs {list(model)} in the model"
                  for k, ckpt, model in mismatched]
        text = (f"{source}: {len(mismatched)} weight(s) have another shape in the checkpoint "
                f"than config.json asks for, so they are random: {_list(shapes, 4)}. "
                "config.json does not describe these weights (another model size?)")
        _refuse_or_warn(text, allow_mismatch)
    if unused:
        text = (f"{source}: {len(unused)} weight(s) in the checkpoint are not used by the model "
                f"config.json (with your keywords) describes: {summarize_names(unused)}. The "
                "model would not be the one saved (a keyword such as n_layer=... overriding "
                "config.json, or the weights of another architecture)")
        _refuse_or_warn(text, allow_missing)


def _refuse_or_warn(text: str, allowed: bool) -> None:
    if allowed:
        warnings.warn(text, stacklevel=5)
    else:
        raise InputError(text + "; pass allow_missing_weights=True to load it anyway")


def summarize_names(names: list[str], limit: int = 8) -> str:
    """Parameter names, listed when few, else grouped by layer.

    >>> summarize_names([f"h.{i}.{p}" for i in (1, 2, 3, 7) for p in "abc"] + ["lm_head"])
    'h.[1-3, 7].* (12 tensors), lm_head'
    """
    if len(names) <= limit:
        return ", ".join(names)
    layers: dict[str, dict[int, int]] = {}
    plain = []
    for name in names:
        match = re.match(r"(.+?)\.(\d+)\.", name)
        if match is None:
            plain.append(name)
        else:
            counts = layers.setdefault(match[1], {})
            counts[int(match[2])] = counts.get(int(match[2]), 0) + 1
    parts = [f"{stem}.{_ranges(sorted(counts))}.* ({sum(counts.values())} tensors)"
             for stem, counts in layers.items()]
    return _list(parts + plain, limit)


def _ranges(numbers: list[int]) -> str:
    runs: list[list[int]] = []
    for n in numbers:
        if runs and n == runs[-1][-1] + 1:
            runs[-1].append(n)
        else:
            runs.append([n])
    text = ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)
    return text if len(numbers) == 1 else f"[{text}]"


def _dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if not isinstance(dtype, str):
        return dtype
    found = getattr(torch, dtype, None)
    if not isinstance(found, torch.dtype):
        raise InputError(f"dtype={dtype!r} is not a torch dtype; use e.g. 'float32', "
                         "'bfloat16' or 'float16' (or torch.float16)")
    return found


@contextmanager
def _quiet_progress(quiet: bool) -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    if quiet and was_on:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if quiet and was_on:
            hf_logging.enable_progress_bar()


# -- the tokenizer ------------------------------------------------------------------------------

def _load_tokenizer(source: Path | str, trust_remote_code: bool, *, own: bool) -> Any:
    """``AutoTokenizer`` from ``source``; ``own``: the model's folder (else ``tokenizer=``)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        if isinstance(source, Path):
            reason = str(exc).strip().splitlines()[0].rstrip(": ")
            raise InputError(_no_tokenizer(source, f"has tokenizer files that make no "
                                           f"tokenizer ({reason})", own)) from exc
        if isinstance(exc, ValueError):
            raise
        raise _hub_error(source, exc) from exc
    if not tokenizer("Hello world", add_special_tokens=False)["input_ids"]:
        raise InputError(_no_tokenizer(source, "gives a tokenizer that turns 'Hello world' "
                                       "into 0 tokens", own))
    return tokenizer


def check_tokenizer_files(source: Path | str, own: bool) -> None:
    """A local model folder (one with config.json) or tokenizer folder has tokenizer files."""
    if not isinstance(source, Path) or (own and not (source / "config.json").exists()):
        return  # a hub id, or not a model folder: from_pretrained says what is wrong first
    if not any((source / name).exists() for name in TOKENIZER_FILES):
        raise InputError(_no_tokenizer(source, "has no tokenizer files", own))


def _no_tokenizer(source: Path | str, problem: str, own: bool) -> str:
    expected = ", ".join(TOKENIZER_FILES[:2]) + " or vocab files (vocab.json + merges.txt, " \
        "tokenizer.model, vocab.txt)"
    fix = ("pass one from elsewhere: ii.load_model(folder, tokenizer='gpt2') (a hub id, a "
           "folder, or a tokenizer object), or save one next to the weights with "
           "tokenizer.save_pretrained(folder)") if own else "pass a folder or hub id that has one"
    return f"{source} {problem}: expected {expected}. To use the model, {fix}"


# -- wrapping -----------------------------------------------------------------------------------

def wrap(module: nn.Module, tokenizer: Any = None, *, adapter: Any = None) -> Model:
    """Wrap a model already in memory: ``ii.wrap(hf_model, tokenizer)``; ``adapter``: an
    ``ii.Adapter`` every analysis then reads (checked now), as ``model.adapter = ...``."""
    if isinstance(module, Model):
        if adapter is not None:
            module.adapter = adapter     # checked now (arch.sites.declare)
        return module
    if not isinstance(module, nn.Module):
        raise InterventionError(f"ii.wrap expects a torch.nn.Module, got {type(module).__name__}")
    if module.training:
        module.eval()
        warnings.warn(TRAIN_MODE_NOTE, stacklevel=2)
    return wrap(Model(module, tokenizer), adapter=adapter)


TRAIN_MODE_NOTE = ("ii.wrap put the model in eval mode (dropout off), so that the same cell "
                   "gives the same numbers; call model.module.train() afterwards to study "
                   "training-mode behaviour")


def warn_if_training(model: Model) -> None:
    """A warning when the model is in train mode: dropout makes every run differ."""
    if model.module.training:
        warnings.warn("the model is in train mode (dropout on): the same cell can give "
                      "different numbers each run; call model.module.eval()", stacklevel=3)
