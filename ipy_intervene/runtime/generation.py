"""Generation options of a ``--generate`` trace: sampling (``do_sample``, ``temperature``,
``top_p``, ``top_k``), a ``seed``, and any other keyword ``model.generate`` takes, checked
by name against ``generate``'s signature and ``GenerationConfig`` before the model runs (a
misspelled option is an error, not an option generate silently ignores).

With a seed, the run draws exactly what ``torch.manual_seed(seed); model.generate(...)``
draws, and the global random state is as before afterwards.

>>> check({"do_sample": True, "temperature": 0.7, "seed": 0}).kwargs
{'do_sample': True, 'temperature': 0.7}
>>> check({"temprature": 0.7})        # doctest: +ELLIPSIS
Traceback (most recent call last):
...
ipy_intervene.errors.InputError: unknown generate option `temprature` (did you mean `temperature`?)...
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from ipy_intervene.errors import InputError

SAMPLING = ("temperature", "top_p", "top_k", "min_p", "typical_p", "epsilon_cutoff",
            "eta_cutoff", "top_h")
OURS = {"max_new_tokens": "--generate N (generate=N)", "max_length": "--generate N (generate=N)",
        "min_new_tokens": "--ignore-eos (ignore_eos=True)",
        "min_length": "--ignore-eos (ignore_eos=True)", "inputs": "INPUT",
        "input_ids": "INPUT", "attention_mask": "INPUT", "pad_token_id": "the model's pad token",
        "generation_config": "the options themselves"}
ROWS = ("num_beams", "num_return_sequences", "num_beam_groups", "assistant_model",
        "prompt_lookup_num_tokens", "penalty_alpha", "synced_gpus", "custom_generate")
OUTPUTS = ("return_dict_in_generate", "output_scores", "output_logits", "output_attentions",
           "output_hidden_states")


@dataclass
class GenerateOptions:
    """Keywords for ``generate`` (``kwargs``) and the ``seed`` (None: the global RNG)."""

    kwargs: dict[str, Any] = field(default_factory=dict)
    seed: int | None = None

    @property
    def sampling(self) -> bool:
        return bool(self.kwargs.get("do_sample"))

    def seeded(self, device: torch.device) -> Any:
        """A block in which the RNG starts from ``seed`` (nothing without one)."""
        return _seeded(self.seed, device) if self.seed is not None else contextlib.nullcontext()


def known_options() -> set[str]:
    """Every keyword ``generate`` takes: its parameters and the fields of GenerationConfig."""
    from transformers import GenerationConfig, GenerationMixin

    params = set(inspect.signature(GenerationMixin.generate).parameters) - {"self", "kwargs"}
    return params | {k for k in GenerationConfig().to_dict() if not k.startswith("_")} | {"seed"}


def check(options: dict[str, Any] | None, line: int | None = None) -> GenerateOptions:
    """The options, or an InputError naming what is wrong and what to write instead."""
    options = dict(options or {})
    known = known_options()
    for name in options:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1)
            hint = f" (did you mean `{close[0]}`?)" if close else ""
            raise InputError(f"unknown generate option `{name}`{hint}: options are the keywords "
                             "model.generate takes (GenerationConfig's fields), and seed",
                             line=line)
        if name in OURS:
            raise InputError(f"`{name}` is set by the trace: use {OURS[name]}", line=line)
        if name in ROWS and options[name] not in (None, 1, False):
            raise InputError(f"`{name}` changes the rows of the batch (beams, several "
                             "sequences per prompt, assisted decoding), which a trace's invokes "
                             "are tied to; a trace generates one sequence per prompt", line=line)
        if name in OUTPUTS and options[name]:
            raise InputError(f"`{name}`: a trace's output is the token ids; read scores, "
                             "logits, attentions or hidden states in the cell, e.g. "
                             "`model.lm_head.output` inside `for step in tracer.steps():`",
                             line=line)
    seed = options.pop("seed", None)
    _check_values(options, seed, line)
    return GenerateOptions(options, seed)


def _check_values(options: dict[str, Any], seed: Any, line: int | None) -> None:
    sample = options.get("do_sample", False)
    if not isinstance(sample, bool):
        raise InputError(f"do_sample must be True or False; got {sample!r}", line=line)
    given = [name for name in SAMPLING if options.get(name) is not None]
    if given and not sample:
        raise InputError(f"{', '.join(given)} only apply when sampling: add do_sample=True "
                         "(--do-sample); without it generation is greedy", line=line)
    if seed is not None and not sample:
        raise InputError("seed= draws the samples of do_sample=True (--do-sample); greedy "
                         "generation draws nothing", line=line)
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
        raise InputError(f"seed must be an int >= 0; got {seed!r}", line=line)
    temperature = options.get("temperature")
    if temperature is not None and not (_number(temperature) and temperature > 0):
        raise InputError(f"temperature must be a number > 0; got {temperature!r}", line=line)
    top_p = options.get("top_p")
    if top_p is not None and not (_number(top_p) and 0 < top_p <= 1):
        raise InputError(f"top_p must be in (0, 1]; got {top_p!r}", line=line)
    top_k = options.get("top_k")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0):
        raise InputError(f"top_k must be an int >= 0 (0: off); got {top_k!r}", line=line)


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type if devices else "cuda"):
        torch.manual_seed(seed)
        yield
