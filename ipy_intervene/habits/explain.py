"""Habits from other tools, and PyTorch habits, that mean something else in a ``%%trace`` cell:
each one a clear error that says what to write here instead.

- nnsight: ``.save()``, ``.value``, ``with model.trace(...)``;
- TransformerLens: ``model.blocks``, ``run_with_cache``, ``hook_*`` names
  (:mod:`ipy_intervene.habits.transformer_lens`), ``utils.get_act_name``;
- a position past the prompt (a read's bare IndexError names the invoke's own prompt length);
- transformers 4: ``model.transformer.h[0].output[0]`` for a decoder layer's hidden states
  (a layer now returns the tensor itself, so ``[0]`` would be batch row 0);
- PyTorch: ``loss.backward()`` needs autograd, which a trace runs without unless ``--grad``;
- a cell that traces one model and uses another model's sites;
- attention patterns that the model's attention implementation does not compute.

>>> explain(AttributeError("'Tensor' object has no attribute 'save'", name="save"), grad=False)
InterventionError("`.save()` is nnsight's: here every name the cell binds is published as a real tensor. Drop `.save()`")
"""

from __future__ import annotations

import ast
import re
from typing import Any

import torch
from torch import nn

from ipy_intervene.errors import InputError, InterventionError, PositionError, SiteError
from ipy_intervene.habits.transformer_lens import act_name_hint
from ipy_intervene.infra.last_trace import note_trace, past_end, trace_root

# what nnsight users write, and what to write in a %%trace cell
_NNSIGHT = {
    "save": "`.save()` is nnsight's: here every name the cell binds is published as a real "
            "tensor. Drop `.save()`",
    "value": "`.value` is nnsight's: here a site's value is already the real tensor. "
             "Drop `.value`",
    "trace": "`with model.trace(...)` is nnsight's: here the cell is the trace. Write "
             "`%%trace model PROMPT` as the cell's first line and the body without the `with`",
    "invoke": "invokes belong to the running trace: write `with tracer.invoke(PROMPT):` in a "
              "%%trace cell",
}


def nnsight_hint(name: str) -> str | None:
    """What to write instead of nnsight's ``name`` (``save``, ``value``, ``trace``...)."""
    return _NNSIGHT.get(name)


_OUT_OF_BOUNDS = re.compile(r"index (-?\d+) is out of bounds for dimension (\d+) with size (\d+)")


def explain(exc: BaseException, *, grad: bool,
            length: int | None = None) -> InterventionError | None:
    """A clear error for a raw one that a known habit caused, else None. ``length``: the
    prompt length to name for positions past it (default: each invoke's own, as the trace's
    batch noted them)."""
    if isinstance(exc, InterventionError):
        return None
    found = _OUT_OF_BOUNDS.fullmatch(str(exc)) if isinstance(exc, IndexError) else None
    if found is not None:  # a cell's read indexed past the prompt
        index, dim, size = map(int, found.groups())
        text = past_end(index, dim, size, None, length=length)
        if text is not None:
            return PositionError(text)
    if (isinstance(exc, NameError) and getattr(exc, "name", None) == "utils"
            or isinstance(exc, ModuleNotFoundError)
            and (getattr(exc, "name", None) or "").startswith("transformer_lens")):
        return InterventionError(act_name_hint(trace_root()))  # TransformerLens's utils
    if isinstance(exc, AttributeError) and getattr(exc, "name", None) in _NNSIGHT:
        if f"object has no attribute '{exc.name}'" in str(exc):
            return InterventionError(_NNSIGHT[exc.name])
    if isinstance(exc, RuntimeError) and not grad and "does not require grad" in str(exc):
        return InterventionError(
            "backward() needs autograd, which a %%trace cell runs without unless asked: add "
            "--grad (`%%trace --grad model ...`, or `ii.trace(..., grad=True)`)")
    return None


# -- another model's sites ----------------------------------------------------------------------

def site_roots(tree: ast.AST, model_name: str) -> list[tuple[str, int]]:
    """(name, line) of each site chain (``x.….output``) rooted at a name other than the
    traced model's: compiled once, checked against the namespace at each run."""
    roots = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in ("output", "input", "inputs"):
            root = node.value
            while isinstance(root, (ast.Attribute, ast.Subscript)):
                root = root.value
            if isinstance(root, ast.Name) and root.id not in (model_name, "tracer"):
                roots.append((root.id, node.lineno))
    return roots


def check_other_models(roots: list[tuple[str, int]], ns: dict, model: Any, model_name: str,
                       model_type: type) -> None:
    """A cell tracing ``model`` that uses the sites of another model in ``ns``."""
    note_trace(None, model.module)  # a new trace: no prompt length until its batch is made
    for name, line in roots:
        other = ns.get(name)
        if isinstance(other, model_type) and other.module is not model.module:
            raise SiteError(
                f"this cell traces `{model_name}`, but this line uses `{name}`, another model "
                f"in the notebook: the forward of `{model_name}` never reaches `{name}`'s "
                f"modules. Write `{model_name}.…` here, or trace `{name}` "
                f"(`%%trace {name} ...`)", line=line)


# -- a decoder layer's output[0] ---------------------------------------------------------------

def check_row0(value: Any, module: nn.Module, label: str) -> None:
    """``layer.output[0]`` on a layer (an item of a ModuleList) whose output is a tensor."""
    if isinstance(value, torch.Tensor) and value.dim() >= 3 and _is_layer(module):
        raise SiteError(
            f"`{label}` is the hidden states themselves, a tensor {list(value.shape)} (decoder "
            f"layers no longer return a tuple), so `[0]` would take batch row 0. Write "
            f"`{label}` for the hidden states (`{label}[0, ...]` if you mean row 0)")


def _is_layer(module: nn.Module) -> bool:
    name = type(module).__name__
    return name.endswith(("Block", "Layer", "DecoderLayer"))


# -- attention patterns ------------------------------------------------------------------------

def attention_implementation(module: nn.Module) -> str | None:
    """The model's attention implementation (``eager``, ``sdpa``, ...), when it says."""
    config = getattr(module, "config", None)
    return getattr(config, "_attn_implementation", None)


def _no_patterns(impl: str | None) -> str:
    return (f"this model runs attention with {impl!r}, which does not compute attention "
            "patterns. Read the site `<attention module>.pattern.output` (that forward then "
            "runs the model's eager attention), or load the model with eager attention: "
            "`ii.load_model(path, attn_implementation=\"eager\")`")


def check_output_attentions(module: nn.Module, kwargs: dict, line: int | None) -> None:
    """``output_attentions=True`` on a model whose attention gives no patterns (it would
    return an empty tuple)."""
    impl = attention_implementation(module)
    if kwargs.get("output_attentions") and impl not in (None, "eager", "ii_eager"):
        raise InputError(f"output_attentions=True would give no patterns: {_no_patterns(impl)}",
                         line=line)


class NoPattern(tuple):
    """An attention module's output whose pattern slot is None because the implementation
    does not compute patterns: indexing that slot is an error, not a silent None."""

    impl: str | None = None
    label: str = ""

    def __getitem__(self, index: Any) -> Any:
        item = super().__getitem__(index)
        if isinstance(index, int) and item is None and index % len(self) == 1:
            raise SiteError(f"`{self.label}[{index}]` (the attention pattern) is None: "
                            f"{_no_patterns(self.impl)}")
        return item


def guard_pattern(value: Any, module: nn.Module, label: str) -> Any:
    """``value`` as a :class:`NoPattern` when it is an attention output without its pattern."""
    if (type(value) is tuple and len(value) >= 2 and value[1] is None
            and "Attention" in type(module).__name__):
        impl = attention_implementation(module)
        if impl not in (None, "eager"):
            guarded = NoPattern(value)
            guarded.impl, guarded.label = impl, label
            return guarded
    return value
