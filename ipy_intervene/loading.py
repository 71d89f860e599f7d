"""Loading a model (``ii.load_model``) and wrapping one already in memory (``ii.wrap``).

>>> import ipy_intervene as ii
>>> model = ii.load_model("demo")
>>> model.config.n_layer, model.module.training
(4, False)
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from ipy_intervene.errors import InputError, InterventionError
from ipy_intervene.model import DEMO_DIR, Model


def load_model(name_or_path: str | Path = "demo", *, device_map: Any = None,
               dtype: torch.dtype | str | None = None, trust_remote_code: bool = False,
               **kwargs: Any) -> Model:
    """Load a causal LM and its tokenizer as an :class:`ii.Model`.

    ``"demo"`` is the embedded model; otherwise a hub id or a local folder, loaded with
    ``AutoModelForCausalLM`` (safetensors only) and ``AutoTokenizer``.

    >>> model = load_model("demo")
    >>> model.config.n_layer
    4
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    demo = str(name_or_path) == "demo"
    path = DEMO_DIR if demo else name_or_path
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    try:
        with _quiet_progress(demo):  # the 3 MB demo loads in an instant: no bar
            module = AutoModelForCausalLM.from_pretrained(
                path, device_map=device_map, dtype=dtype, use_safetensors=True,
                trust_remote_code=trust_remote_code, **kwargs)
    except OSError as exc:
        if "safetensors" not in str(exc):
            raise
        raise InputError(f"{name_or_path}: no safetensors weights. ipy_intervene loads "
                         "safetensors only (pickled .bin/.pt files can run code when loaded); "
                         "convert them once where you trust them: "
                         "model.save_pretrained(folder) writes model.safetensors") from exc
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    return Model(module.eval(), tokenizer)


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


def wrap(module: nn.Module, tokenizer: Any = None) -> Model:
    """Wrap a model already in memory: ``ii.wrap(hf_model, tokenizer)``."""
    if isinstance(module, Model):
        return module
    if not isinstance(module, nn.Module):
        raise InterventionError(f"ii.wrap expects a torch.nn.Module, got {type(module).__name__}")
    if module.training:
        module.eval()
        warnings.warn(TRAIN_MODE_NOTE, stacklevel=2)
    return Model(module, tokenizer)


TRAIN_MODE_NOTE = ("ii.wrap put the model in eval mode (dropout off), so that the same cell "
                   "gives the same numbers; call model.module.train() afterwards to study "
                   "training-mode behaviour")


def warn_if_training(model: Model) -> None:
    """A warning when the model is in train mode: dropout makes every run differ."""
    if model.module.training:
        warnings.warn("the model is in train mode (dropout on): the same cell can give "
                      "different numbers each run; call model.module.eval()", stacklevel=3)
