"""One prompt alone, no padding, plain PyTorch hooks: the oracle the invoke tests compare a
batched trace with (tests/test_invoke_semantics.py, tests/test_invoke_positions.py)."""

from __future__ import annotations

from contextlib import ExitStack

import torch
from torch import nn

from ipy_intervene.arch.sites import get_path


def module(model, path: str) -> nn.Module:
    """The module at ``path`` (``model.`` prefix optional) of a wrapped model."""
    return get_path(model.module, path.removeprefix("model."))


def ids(model, text):
    return model.tokenizer(text, return_tensors="pt").input_ids


def run_alone(model, text, post=(), pre=(), grad=False):
    """Logits of ``text`` alone with (module path, fn) forward hooks and pre-hooks."""
    with ExitStack() as stack:
        for path, fn in post:
            stack.callback(module(model, path).register_forward_hook(fn).remove)
        for path, fn in pre:
            stack.callback(module(model, path).register_forward_pre_hook(fn).remove)
        with torch.set_grad_enabled(grad):
            return model.module(ids(model, text)).logits


def edit(fn):
    """A forward hook that edits a clone of the output with ``fn(out)``."""
    def hook(mod, args, out):
        out = out.clone()
        fn(out)
        return out
    return hook
