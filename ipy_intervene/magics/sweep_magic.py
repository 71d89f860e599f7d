"""The ``%patch_sweep`` line magic: argument parsing and display only."""

from __future__ import annotations

import ast
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_magic, magics_class, no_var_expand
from IPython.display import display

from ipy_intervene import metrics
from ipy_intervene.magics.command import SweepCommand
from ipy_intervene.magics.trace_magic import as_model, evaluate
from ipy_intervene.sweep import SweepResult, patch_sweep

MAGIC = "%patch_sweep"
WORDS = {"site", "method", "direction", "out"}             # taken as written
EXPRESSIONS = {"clean", "corrupted", "metric", "layers", "positions", "heads", "subject",
               "samples", "noise", "noise_std", "seed", "window", "batch_size"}
FLAGS = {"quiet"}
METRIC_HELPERS = {"logit_diff": metrics.logit_diff, "prob": metrics.prob,
                  "logprob": metrics.logprob}


@magics_class
class SweepMagics(Magics):
    @no_var_expand
    @line_magic
    def patch_sweep(self, line: str) -> SweepResult | None:
        """Activation patching (exact), attribution patching or causal tracing over a grid.

        %patch_sweep MODEL --clean X --corrupted Y --metric M [options]

        Values are Python, evaluated in the notebook; in ``--metric``, ``logit_diff(correct,
        wrong)``, ``prob(token)`` and ``logprob(token)`` are available. The result is stored
        in ``_sweep`` (and in ``--out NAME``) and shown as a heatmap.

        Options
        -------
        --clean X        clean prompt(s)
        --corrupted Y    corrupted prompt(s), token for token as long as the clean ones
        --metric M       logit_diff("Mary", "John"), prob("Paris"), or a callable
        --site S         resid_pre (default), resid_mid, resid_post, attn_out, mlp_out,
                         head_out, head_out_pos
        --method M       activation (default, exact), attribution, noise (causal tracing)
        --direction D    denoising (default: clean into corrupted) or noising
        --layers L       layers to sweep, e.g. range(4) (default: all)
        --positions P    positions to sweep, e.g. [-1, 10] (default: all)
        --heads H        heads to sweep (head sites; default: all)
        --subject S      causal tracing: the subject's text (or token positions) to noise
        --samples N      causal tracing: noised copies (default 10)
        --noise K        causal tracing: noise std as a multiple of the subject
                         embeddings' std (default 3)
        --seed N         causal tracing: the noise's seed (default 0)
        --window W       layers restored together around each layer (default 1)
        --batch-size N   grid cells per batched forward (default: fit the memory budget)
        --out NAME       also store the SweepResult in NAME
        --quiet          show nothing

        Examples
        --------
        In [1]: %patch_sweep model --clean clean --corrupted corrupt --metric logit_diff("Mary", "John")
        In [2]: %patch_sweep model --clean clean --corrupted corrupt --metric logit_diff("Mary", "John") --site head_out --out heads
        In [3]: %patch_sweep model --clean fact --method noise --subject "Thuzor Quenosk Fountain" --site mlp_out --window 3
        """
        command = SweepCommand.parse(line)
        options = command.options
        _check_names(options)
        out = _out_name(options["out"]) if "out" in options else None
        model = as_model(self._eval(command.model, "MODEL"), command.model, MAGIC)
        kwargs = {name: self._value(name, text) for name, text in options.items()
                  if name not in FLAGS | {"out"}}
        if "clean" not in kwargs:
            raise UsageError(f"{MAGIC} needs --clean X (the prompt(s) to patch from)")
        clean = kwargs.pop("clean")
        result = patch_sweep(model, clean, **kwargs)
        self.shell.user_ns["_sweep"] = result
        if out is not None:
            self.shell.user_ns[out] = result
        if "quiet" not in options:
            display(result)
        return None

    def _eval(self, expr: str, role: str) -> Any:
        return evaluate(self.shell, expr, role, MAGIC, METRIC_HELPERS)

    def _value(self, name: str, text: str) -> Any:
        if not text:
            raise UsageError(f"{MAGIC}: --{name.replace('_', '-')} needs a value")
        if name in WORDS:
            return _word(text)
        return self._eval(text, f"--{name.replace('_', '-')}")


def _check_names(options: dict[str, str]) -> None:
    known = WORDS | EXPRESSIONS | FLAGS
    for name in options:
        if name not in known:
            listing = ", ".join(f"--{n.replace('_', '-')}" for n in sorted(known))
            raise UsageError(f"{MAGIC}: unknown option --{name.replace('_', '-')}; options: "
                             f"{listing}")
    for flag in FLAGS:
        if options.get(flag):
            raise UsageError(f"{MAGIC}: --{flag} takes no value")


def _word(text: str) -> str:
    """``mlp_out`` or ``"mlp_out"``: the same word."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
    return value if isinstance(value, str) else text


def _out_name(text: str) -> str:
    name = _word(text)
    if not name.isidentifier():
        raise UsageError(f"{MAGIC}: --out {text!r} is not a valid Python name")
    return name
