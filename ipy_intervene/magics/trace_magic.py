"""The ``%%trace`` cell magic: argument parsing and display only."""

from __future__ import annotations

from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, magics_class, no_var_expand
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring
from IPython.display import display

from ipy_intervene.compiler.compile import compile_cell
from ipy_intervene.edits.api import NO_INPUT as EDIT_NO_INPUT
from ipy_intervene.edits.api import edit, edits
from ipy_intervene.magics.command import TraceCommand, generate_values
from ipy_intervene.magics.evaluate import evaluate
from ipy_intervene.magics.trace_def import (
    TracedCell,
    as_model,
    check_options,
    signature_of,
    take_def,
)
from ipy_intervene.magics.tracebacks import shorten, title_of
from ipy_intervene.model.envoys import Model
from ipy_intervene.tracing.trace import NO_INPUT, TraceResult, run_compiled


@magics_class
class TraceMagics(Magics):
    @magic_arguments()
    @argument("model", help="an ii.Model (or torch.nn.Module) in the notebook, e.g. `model`")
    @argument("input", nargs="?", help="a prompt, a list of prompts, token ids or a dict of "
                                       "model kwargs; omit it to use `with tracer.invoke(X):`")
    @argument("--generate", type=int, metavar="N", help="run generate with N new tokens")
    @argument("--ignore-eos", action="store_true", help="with --generate: run all N steps "
              "(end-of-text cannot be chosen before the last)")
    @argument("--grad", action="store_true", help="autograd on: .retain_grad(), .backward()")
    @argument("--graph", action="store_true", help="show the intervention graph after the run")
    @argument("--dry-run", action="store_true", help="run on fake tensors: shapes and indices "
              "checked, nothing computed or published")
    @argument("--out", metavar="NAME", help="also store the TraceResult in NAME")
    @argument("--quiet", action="store_true", help="display nothing")
    @argument("--edit", metavar="NAME", help="the cell becomes an edit: NAME is MODEL (the "
              "same weights, no copy; MODEL itself unchanged) with the cell's interventions "
              "applied at every later forward, generation step, sweep and pipeline; values "
              "the cell reads are captured now; INPUT, if given, is run once to check it")
    @argument("--inplace", action="store_true", help="with --edit: edit MODEL itself "
              "(ii.clear_edits(MODEL) removes its edits)")
    @argument("--def", dest="define", metavar="NAME(ARGS)", help="define NAME(ARGS) in the "
              "notebook, a function that runs this cell with ARGS bound and returns its "
              "TraceResult (nothing runs now)")
    @no_var_expand
    @cell_magic
    def trace(self, line: str, cell: str) -> None:
        """Run the cell against one forward (or generate) of MODEL, with real values.

        The cell is ordinary Python. Module sites read and change the running forward:
        ``m.output``, ``m.input``, ``m.inputs`` (readable and assignable), ``m.output[...] = v``
        (in-place edit), ``m.skip(value)``, and ``m(x)`` (run the module ad hoc). Every name
        the cell binds appears in the notebook as a real tensor; a failing cell publishes
        nothing and leaves the model as it was. The result is stored in ``_trace``.

        Inside the cell, ``tracer`` offers ``tracer.invoke(X)`` (several inputs in one batched
        forward), ``tracer.steps()``, ``tracer.stop()`` and ``tracer.output``.

        Examples
        --------
        In [1]: %load_ext ipy_intervene
        In [2]: import ipy_intervene as ii; model = ii.load_model("demo")
        In [3]: %%trace model "When Mary and John went to the store , John gave a drink to"
           ...: h = model.transformer.h[2].output
           ...: model.transformer.h[3].mlp.output[:, -1] = 0
           ...: logits = model.lm_head.output
        In [4]: %%trace model
           ...: with tracer.invoke("When Mary and John went to the store , John gave a drink to"):
           ...:     clean = model.transformer.h[1].output
           ...: with tracer.invoke("When Mary and John went to the store , Mary gave a drink to"):
           ...:     model.transformer.h[1].output = clean
           ...:     patched = model.lm_head.output
        In [5]: %%trace model "When Mary and John" --generate 3
           ...: for step in tracer.steps():
           ...:     logits = model.lm_head.output
           ...: tokens = tracer.output
        In [6]: %%trace model "When Mary and John" --generate 8 --do-sample --temperature 0.7 --seed 0
           ...: tokens = tracer.output
        In [7]: %%trace model prompt --def steer(coef, latent=43)
           ...: model.transformer.h[2].sae.latents.output[:, -1, latent] *= coef
           ...: logits = model.lm_head.output
        In [8]: [steer(c).names["logits"][0, -1].argmax() for c in (0.0, 1.0, 4.0)]
        In [9]: %%trace model --edit no_head
           ...: model.transformer.h[3].attn.c_proj.input[:, :, 96:128] = 0
        In [10]: ii.edits(no_head), ii.clear_edits(no_head)

        Sampling options (with --generate): --do-sample, --temperature T, --top-p P,
        --top-k K, --seed N (draws what torch.manual_seed(N); model.generate(...) draws),
        --generate-kwargs DICT (any other keyword of model.generate, checked by name).
        """
        line, define = take_def(line)
        command, sampling = TraceCommand.parse(line).split_generation()
        args = parse_argstring(self.trace, f"_ {command.options}")
        shell = self.shell
        args.generate_options = generate_values(
            sampling, lambda text, flag: evaluate(shell, text, flag, "%%trace"))
        if define is not None:
            self._define(define, line, cell, command, args)
            return
        model = as_model(evaluate(shell, command.model, "MODEL", "%%trace"), command.model,
                         "%%trace")
        input_ = NO_INPUT
        if command.input is not None:
            input_ = evaluate(shell, command.input, "INPUT", "%%trace")
        if args.edit is not None or args.inplace:
            self._edit(model, command, line, cell, input_, args)
            return
        if args.generate is not None and args.generate < 1:
            raise UsageError("%%trace: --generate N needs N >= 1 new tokens")
        if args.ignore_eos and args.generate is None:
            raise UsageError("%%trace: --ignore-eos goes with --generate N")
        source, filename = self._cache(f"%%trace {line}", cell)
        try:
            result = self._run(model, command, source, filename, input_, args)
        except Exception as exc:
            shorten(exc, filename, title_of(shell))
            graph = getattr(exc, "graph", None)
            if args.graph and not args.quiet and graph is not None:
                from ipy_intervene.widgets.graph_view import GraphView

                display(GraphView(graph))  # the failing line's node is marked in red
            raise
        self._show(result, args)

    trace.__doc__ = (trace.__doc__ or "").replace("  %trace ", "  %%trace ", 1).replace(
        "``", "`")  # magic_arguments writes a cell magic's usage as a line magic's

    def _cache(self, magic_line: str, cell: str) -> tuple[str, str]:
        """The cell's Python and its file name for tracebacks, numbered as in the editor:
        the magic line is line 1 (compiled as a blank line), the cell's first line is 2."""
        source = self.shell.transform_cell(cell)
        filename = self.shell.compile.cache(f"{magic_line}\n{source}",
                                            self.shell.execution_count,
                                            raw_code=f"{magic_line}\n{cell}")
        return "\n" + source, filename

    def _define(self, spec: str, line: str, cell: str, command: TraceCommand,
                args: Any) -> None:
        """``--def NAME(ARGS)``: compile the cell now, bind NAME to a :class:`TracedCell`."""
        options = check_options(args)
        name, signature = signature_of(spec, self.shell.user_ns)
        source, filename = self._cache(f"%%trace {line} --def {spec}", cell)
        shell = self.shell
        try:
            compiled = compile_cell(source, model_expr=command.model,
                                    has_input=command.input is not None, filename=filename,
                                    transform_ast=shell.transform_ast if shell.ast_transformers
                                    else None)
        except Exception as exc:
            shorten(exc, filename, title_of(shell))
            raise
        shell.user_ns[name] = TracedCell(name, signature, shell, command, compiled, filename,
                                         title_of(shell), options)

    def _edit(self, model: Model, command: TraceCommand, line: str, cell: str, input_: Any,
              args: Any) -> None:
        """``--edit NAME``: the cell becomes a lasting edit (``ii.edit``); NAME is bound to
        the edited model only if making it succeeds."""
        name = args.edit
        if name is None:
            raise UsageError("%%trace: --inplace goes with --edit NAME")
        given = [flag for flag, on in (("--generate", args.generate is not None),
                                       ("--grad", args.grad), ("--graph", args.graph),
                                       ("--dry-run", args.dry_run), ("--out", args.out),
                                       ("--ignore-eos", args.ignore_eos),
                                       ("sampling options", bool(args.generate_options)))
                 if on]
        if given:
            raise UsageError(f"%%trace --edit: {', '.join(given)} do not go with --edit (an "
                             "edit applies at every later forward; generate with NAME)")
        if not command.model.isidentifier() or not name.isidentifier():
            raise UsageError("%%trace --edit NAME: MODEL and NAME must be plain names, e.g. "
                             "%%trace model --edit steered")
        source, filename = self._cache(f"%%trace {line}", cell)
        shell = self.shell
        try:
            edited = edit(model, source, name=name, inplace=args.inplace,
                          namespace=shell.user_ns, model_name=command.model,
                          input=EDIT_NO_INPUT if input_ is NO_INPUT else input_,
                          filename=filename, where=title_of(shell))
        except Exception as exc:
            shorten(exc, filename, title_of(shell))
            raise
        shell.user_ns[name] = edited
        if not args.quiet:
            how = "edited in place" if args.inplace else f"a new model on {command.model}'s weights"
            print(f"{name}: {how}, with {len(edits(edited))} edit(s)")

    def _run(self, model: Model, command: TraceCommand, source: str, filename: str,
             input_: Any, args: Any) -> TraceResult:
        __tracebackhide__ = True
        shell = self.shell
        compiled = compile_cell(source, model_expr=command.model,
                                has_input=input_ is not NO_INPUT, filename=filename,
                                transform_ast=shell.transform_ast if shell.ast_transformers
                                else None)
        result = run_compiled(model, compiled, shell.user_ns, input_, generate=args.generate,
                              ignore_eos=args.ignore_eos, grad=args.grad,
                              dry_run=args.dry_run, generate_options=args.generate_options)
        shell.user_ns["_trace"] = result
        if args.out:
            shell.user_ns[args.out] = result
        return result

    def _show(self, result: TraceResult, args: Any) -> None:
        if args.quiet:
            return
        if args.dry_run:
            print(result.summary())
            display(result.show_graph())
        elif args.graph:
            display(result.show_graph())
