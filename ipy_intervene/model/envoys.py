"""The model as a cell sees it: :class:`Model` and its module tree of envoys (loading is in
:mod:`ipy_intervene.model.loading`, inputs in :mod:`ipy_intervene.model.encode` and
:mod:`ipy_intervene.model.batch`). The tree follows ``model.module``: a module replaced or added
after wrapping (``model.transformer.h[2] = block``) is what the next access sees.

>>> import ipy_intervene as ii
>>> model = ii.load_model("demo")
>>> model.transformer.h[-1]                                  # doctest: +ELLIPSIS
GPT2Block(...)
>>> model.transformer.h[-1].path
'transformer.h[3]'
"""

from __future__ import annotations

import difflib
import inspect
import types
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from ipy_intervene.arch import attention, moe
from ipy_intervene.errors import InputError, MissingAttributeError, SiteError
from ipy_intervene.habits.explain import nnsight_hint
from ipy_intervene.habits.transformer_lens import tl_hint
from ipy_intervene.infra import active
from ipy_intervene.model import encode
from ipy_intervene.model.batch import Batch, describe
from ipy_intervene.model.placement import input_device
from ipy_intervene.model.tokens import check_known

DEMO_DIR = Path(__file__).resolve().parent.parent / "demo" / "weights"


class Envoy:
    """A module of the model as the cell sees it.

    Attribute access gives child modules (as envoys) or the module's own attributes;
    indexing works on ``ModuleList``/``Sequential``/``ModuleDict``. Inside a trace,
    ``.output``, ``.input`` and ``.inputs`` are the real values of the running forward;
    assigning them changes it; ``.skip(value)`` replaces the module; calling the envoy runs
    the module ad hoc on a value.
    """

    __slots__ = ("_module", "_path", "_children", "_root")

    def __init__(self, module: nn.Module, path: str, root: nn.Module | None = None) -> None:
        object.__setattr__(self, "_module", module)
        object.__setattr__(self, "_path", path)
        object.__setattr__(self, "_children", {})
        object.__setattr__(self, "_root", module if root is None else root)

    # -- tree -----------------------------------------------------------------------------

    @property
    def path(self) -> str:
        """Path from the root, in the cell's syntax: ``"transformer.h[3].mlp"``."""
        return self._path

    @property
    def module(self) -> nn.Module:
        """The underlying ``torch.nn.Module``."""
        return self._module

    def _child(self, key: str | int, path: str, module: nn.Module | None = None) -> "Envoy":
        """The envoy of child ``key``, cached while it still wraps the live child (a module
        replaced in ``model.module`` after wrapping gets a new envoy)."""
        if module is None:
            module = self._module[key] if isinstance(key, int) else self._module._modules[key]
        envoy = self._children.get(key)
        if envoy is None or envoy._module is not module:
            envoy = Envoy(module, path, self._root)
            self._children[key] = envoy
        return envoy

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        module = self._module
        if name in module._modules:
            return self._child(name, f"{self._path}.{name}" if self._path else name)
        # q, k, v, pattern, z of an attention module; router_logits, ... of an MoE block
        inner = attention.point(module, name) or moe.point(module, name)
        if inner is not None:
            return self._child(name, f"{self._path}.{name}", inner)
        try:
            return getattr(module, name)
        except AttributeError:
            raise MissingAttributeError(self._missing(name)) from None

    def _missing(self, name: str) -> str:
        habit = nnsight_hint(name) or tl_hint(name, self._path, self._root)
        if habit is not None:
            return habit
        children = list(self._module._modules)
        close = difflib.get_close_matches(name, children, n=1)
        hint = f" Did you mean `{close[0]}`?" if close else ""
        where = f"model.{self._path}" if self._path else "model"
        listing = ", ".join(children) if children else "none"
        return (f"`{name}` is not a module or attribute of {where} "
                f"({type(self._module).__name__}).{hint} Its child modules: {listing}")

    def __getitem__(self, index: int | str) -> "Envoy":
        expert = moe.expert_point(self._module, index)    # experts[e] of fused MoE experts
        if expert is not None:
            return self._child(index, f"{self._path}[{index}]", expert)
        index = self._key(index)
        text = repr(index) if isinstance(index, str) else index
        return self._child(index, f"{self._path}[{text}]")

    def __setitem__(self, index: int | str, value: nn.Module) -> None:
        """Replace a layer: ``model.transformer.h[2] = MyBlock(...)`` (outside a trace)."""
        index = self._key(index)
        text = repr(index) if isinstance(index, str) else index
        _check_replacement(f"model.{self._path}[{text}]", value)
        self._module[index] = value

    def _key(self, index: int | str) -> int | str:
        """``index`` checked against this ModuleList/Sequential/ModuleDict (negative ints
        counted from the end)."""
        module = self._module
        if isinstance(module, nn.ModuleDict):
            if index not in module:
                raise SiteError(f"model.{self._path} has no key {index!r}; keys: "
                                f"{', '.join(module.keys())}")
            return index
        if not isinstance(module, (nn.ModuleList, nn.Sequential)):
            raise SiteError(f"model.{self._path} ({type(module).__name__}) cannot be indexed; "
                            f"only ModuleList, Sequential and ModuleDict can")
        if not isinstance(index, int) or isinstance(index, bool):
            raise SiteError(f"model.{self._path}[{index!r}]: the index must be an int, "
                            f"got {type(index).__name__}")
        n = len(module)
        if not -n <= index < n:
            raise SiteError(f"layer index {index} is past the end: model.{self._path} has "
                            f"{n} layers (0..{n - 1}, or -{n}..-1)")
        return index % n

    def __len__(self) -> int:
        return len(self._module)

    def __bool__(self) -> bool:
        return True

    def __iter__(self) -> Iterator["Envoy"]:
        for i in range(len(self._module)):
            yield self[i]

    def __dir__(self) -> list[str]:
        inner = set(attention.ATTENTION_SITES) if attention.is_attention(self._module) else set()
        inner |= {name for name in moe.MOE_SITES if moe.point(self._module, name) is not None}
        return sorted(set(self._module._modules) | inner | {"output", "input", "inputs", "skip",
                                                             "path"})

    def __repr__(self) -> str:
        return repr(self._module)

    # -- sites (resolved by the running trace) ---------------------------------------------

    @property
    def output(self) -> Any:
        return _ask(self, "output", "read")

    @output.setter
    def output(self, value: Any) -> None:
        _ask(self, "output", "write", value)

    @property
    def input(self) -> Any:
        return _ask(self, "input", "read")

    @input.setter
    def input(self, value: Any) -> None:
        _ask(self, "input", "write", value)

    @property
    def inputs(self) -> Any:
        return _ask(self, "inputs", "read")

    @inputs.setter
    def inputs(self, value: Any) -> None:
        _ask(self, "inputs", "write", value)

    def skip(self, value: Any) -> None:
        """Do not run this module in the trace; ``value`` is its output."""
        _ask(self, "skip", "skip", value)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the module ad hoc on a value (no hooks of ours fire); inside or outside traces."""
        module = self._module
        has_weights = next(module.parameters(), None) is not None
        device = input_device(module) if has_weights else None  # offloaded: where it runs
        if device is not None:
            args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)
        with active.hook_scope(()):
            return module(*args, **kwargs)

    def __setattr__(self, name: str, value: Any) -> None:
        own = getattr(type(self), name, None)
        if isinstance(own, types.MemberDescriptorType) or (
                isinstance(own, property) and own.fset is not None):
            object.__setattr__(self, name, value)  # .output/.input/.inputs, model.tokenizer
            return
        if isinstance(own, property) and not hasattr(self._module, name):
            raise AttributeError(f"`.{name}` of model.{self._path or '(root)'} is read-only")
        if isinstance(value, nn.Module) or name in self._module._modules:
            where = f"model.{self._path}.{name}" if self._path else f"model.{name}"
            _check_replacement(where, value)
        setattr(self._module, name, value)  # a module is added or replaced in model.module


def _check_replacement(where: str, value: Any) -> None:
    """A module put into the tree after wrapping: an ``nn.Module``, and not while a trace
    runs (its hooks are on the modules the cell started with)."""
    if not isinstance(value, nn.Module):
        raise SiteError(f"`{where} = ...` replaces a module: assign a torch.nn.Module (for a "
                        f"module that does nothing, torch.nn.Identity()); got "
                        f"{describe(value)}")
    if active.current_trace() is not None:
        raise SiteError(f"`{where} = ...` replaces a module while a trace runs; replace it "
                        "before the %%trace cell, or inside one use `.skip(value)` or "
                        "`.output = value`")


def _ask(envoy: Envoy, attr: str, access: str, payload: Any = None) -> Any:
    """A site used through an envoy the compiler could not see (a loop variable, a function's
    argument): asked of the running trace, recorded as a site of line 0."""
    __tracebackhide__ = True
    what = ".skip()" if attr == "skip" else f".{attr}"
    return active.require_trace(what).ask(envoy, attr, access, None, payload)


class Model(Envoy):
    """The root of the module tree: a causal LM (or any ``nn.Module``) and its tokenizer."""

    __slots__ = ("tokenizer", "_forward_params", "_names", "_first_param", "_var_keyword")

    def __init__(self, module: nn.Module, tokenizer: Any = None) -> None:
        super().__init__(module, "")
        object.__setattr__(self, "tokenizer", tokenizer)
        signature = inspect.signature(module.forward).parameters
        object.__setattr__(self, "_forward_params", set(signature))
        first = next(iter(signature.values()), None)
        object.__setattr__(self, "_first_param", first.name if first is not None and first.kind
                           in (first.POSITIONAL_ONLY, first.POSITIONAL_OR_KEYWORD) else None)
        object.__setattr__(self, "_var_keyword",
                           any(p.kind is p.VAR_KEYWORD for p in signature.values()))
        object.__setattr__(self, "_names", None)  # id(module) -> dotted name, built on demand
        if tokenizer is not None and getattr(tokenizer, "pad_token_id", None) is None:
            tokenizer.pad_token = tokenizer.eos_token

    def owns(self, module: nn.Module) -> bool:
        """Whether ``module`` is one of this model's modules (or a site inside its attention)."""
        if isinstance(module, attention.HookPoint):
            module = attention.owner(module)
        elif isinstance(module, moe.MoePoint):
            module = moe.owner(module)
        return module is not None and self._name_of(module) is not None

    def _name_of(self, module: nn.Module) -> str | None:
        """The dotted name of ``module`` in the live tree (None if it is not in it). The
        cached names are checked against ``model.module`` and rebuilt when it changed."""
        names = self._names
        entry = names.get(id(module)) if names is not None else None
        if entry is None or self._at(entry[1]) is not module:
            names = {id(m): (n, tuple(n.split(".")) if n else ())
                     for n, m in self._module.named_modules()}
            object.__setattr__(self, "_names", names)
            entry = names.get(id(module))
        return entry[0] if entry is not None else None

    def _at(self, parts: tuple[str, ...]) -> nn.Module | None:
        module = self._module
        for part in parts:
            module = module._modules.get(part)
            if module is None:
                return None
        return module

    def envoy_for(self, module: nn.Module) -> Envoy | None:
        """The envoy of one of this model's modules (for cells that use the raw module)."""
        name = self._name_of(module)
        if name is None:
            return None
        envoy: Envoy = self
        for part in name.split(".") if name else []:
            envoy = envoy[int(part)] if part.isdigit() else getattr(envoy, part)
        return envoy if envoy.module is module else None

    @property
    def device(self) -> torch.device:
        """Where inputs go: the device of the input embeddings (or the first parameter), or,
        for weights offloaded to ``meta`` by accelerate, the device the model runs on."""
        from ipy_intervene.model.placement import input_device

        return input_device(self._module)

    @property
    def config(self) -> Any:
        return getattr(self._module, "config", None)

    @property
    def adapter(self) -> Any:
        """The site map (an ``ii.Adapter``) every analysis reads for this model: one set by
        hand, else the family's from the table, else one discovered from the module tree;
        checked on one small forward before first use (:mod:`ipy_intervene.arch.check`).

        >>> model.adapter = ii.Adapter("mine", blocks="net.blocks", ...)   # doctest: +SKIP
        >>> model.adapter = None          # back to the family's map       # doctest: +SKIP
        """
        from ipy_intervene.arch.sites import adapter_for

        return adapter_for(self)

    @adapter.setter
    def adapter(self, value: Any) -> None:
        from ipy_intervene.arch.sites import declare

        declare(self._module, value)

    def __repr__(self) -> str:
        return repr(self._module)

    def prepare(self, inputs: list[Any], *, line: int | None = None,
                new_tokens: int = 0) -> "Batch":
        """The inputs of all invokes as one batch (``new_tokens``: what generate adds).

        Token inputs (prompts, token ids, a dict with ``input_ids``) are tokenized and
        left-padded; tensor inputs of any other module (a tensor, a tuple of tensors, a dict
        of keyword tensors) are passed as they are and concatenated along dim 0.

        >>> model.prepare(["When Mary", "Then John went"]).rows
        [slice(0, 1, None), slice(1, 2, None)]
        """
        return encode.prepare(self, inputs, line=line, new_tokens=new_tokens)

    @property
    def vocab_size(self) -> int | None:
        """Rows of the input embedding: the token ids the model can read."""
        get = getattr(self._module, "get_input_embeddings", None)
        emb = get() if get is not None else None
        return getattr(emb, "num_embeddings", None)

    @property
    def is_token_model(self) -> bool:
        """Whether INPUT means tokens: the forward takes ``input_ids`` (or ``**kwargs`` and
        the model has a tokenizer)."""
        return "input_ids" in self._forward_params or (
            self._var_keyword and self.tokenizer is not None)

    @property
    def max_length(self) -> int | None:
        """The number of positions the model has, when its config says (else None)."""
        config = self.config
        for name in ("n_positions", "max_position_embeddings"):
            value = getattr(config, name, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    @property
    def pad_id(self) -> int:
        """The token id that pads shorter prompts: the tokenizer's, else 0 (masked out)."""
        tok = self.tokenizer
        pad = getattr(tok, "pad_token_id", None) if tok is not None else None
        return int(pad) if pad is not None else 0

    def to_tokens(self, text: str | list[str]) -> torch.Tensor:
        """Token ids of a prompt (or a left-padded batch of prompts)."""
        texts = [text] if isinstance(text, str) else list(text)
        return encode.tokenize(self.tokenizer, texts, None)["input_ids"]

    def to_str_tokens(self, text: str | torch.Tensor) -> list[str]:
        """The tokens of one prompt as strings: labels for plots."""
        ids = self.to_tokens(text)[0] if isinstance(text, str) else text.flatten()
        return [self.tokenizer.decode([int(i)]) for i in ids]

    def token_id(self, word: str) -> int:
        """The id of a single-token word; a clear error if it is not one token."""
        ids = self.tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise InputError(f"{word!r} is {len(ids)} tokens for this tokenizer, not one")
        check_known(self.tokenizer, [word], torch.tensor(ids))
        return int(ids[0])
