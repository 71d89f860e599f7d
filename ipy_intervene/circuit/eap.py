"""Edge attribution patching (EAP) and EAP with integrated gradients (EAP-IG).

For an edge ``u -> v`` of the component graph (:mod:`ipy_intervene.circuit.graph`)::

    EAP     score(u -> v) = (clean_u - corrupted_u) . d metric / d input_v   at the corrupted run
    EAP-IG  the same difference times the mean of that gradient over ``steps`` runs whose
            input embeddings (block 0's input) are corrupted + (k / steps) (clean - corrupted),
            k = 0 .. steps - 1 (a left Riemann sum: steps=1 is EAP exactly)

``clean_u`` / ``corrupted_u``: u's write into the residual stream in each run; ``input_v``: the
residual stream as receiver v alone reads it (each head's q, k, v input separately, before
the norm), so the score is the first-order estimate of how much the metric changes when, in
the corrupted run, v's input gets u's clean write instead of its corrupted one. The dot
product runs over every position and d_model; the score is the **mean over prompts** of that
per-prompt number (``per_prompt`` keeps each).

``direction`` says which run is patched into which, and so the sign:

- ``"denoising"`` (default): the estimate of patching the clean run's writes into the
  corrupted run, ``(clean_u - corrupted_u) . grad`` at the corrupted run; EAP-IG integrates
  from the corrupted inputs towards the clean ones. Positive: the edge restores the clean
  behaviour.
- ``"noising"``: the estimate of patching the corrupted run's writes into the clean run,
  ``(corrupted_u - clean_u) . grad`` at the clean run; EAP-IG integrates from the clean
  inputs towards the corrupted ones. This is the convention of Syed et al. 2023
  ("Attribution Patching Outperforms Automated Circuit Discovery": corrupted activations
  into the clean run, as ACDC ablates) and of Hanna et al. 2024 ("Have Faith in
  Faithfulness", EAP-IG: ``(z'_u - z_u)`` with ``z'`` corrupted). Negative: the edge is
  needed for the clean behaviour. ``noising`` on (clean, corrupted) gives exactly the scores
  of ``denoising`` on (corrupted, clean).

Cost: EAP is one clean forward plus one corrupted forward and one backward; EAP-IG is one
clean forward plus ``steps`` forwards and backwards (its first step is the corrupted run).

>>> import ipy_intervene as ii
>>> model = ii.load_model("demo")
>>> r = edge_attribution(model, "When Mary and John went to the store , John gave a drink to",
...                      "When Mary and John went to the store , Mary gave a drink to",
...                      ii.logit_diff("Mary", "John"))
>>> r.scores.shape
torch.Size([21, 53])
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ipy_intervene.analysis.inputs import prepare_pair
from ipy_intervene.analysis.metrics import as_metric
from ipy_intervene.analysis.reads import OnLogits
from ipy_intervene.circuit.graph import Graph, build_graph
from ipy_intervene.circuit.result import EdgeResult
from ipy_intervene.circuit.runs import GraphRun, Writes
from ipy_intervene.circuit.verify import record
from ipy_intervene.errors import InputError
from ipy_intervene.infra.hooks import HookSession, entry_point
from ipy_intervene.infra.progress import progress_disabled
from ipy_intervene.model.loading import warn_if_training, wrap

METHODS = ("eap", "eap-ig")
DIRECTIONS = ("denoising", "noising")


@entry_point
def edge_attribution(model: Any, clean: Any, corrupted: Any, metric: Any, *,
                     method: str = "eap", steps: int = 5,
                     direction: str = "denoising", adapter: Any = None) -> EdgeResult:
    """Score every edge of the component graph (see the module docstring).

    ``clean`` / ``corrupted``: a prompt or a list of prompts that align token for token;
    ``metric``: ``ii.logit_diff(...)`` or any callable from logits to one number per prompt;
    ``method``: ``"eap"`` or ``"eap-ig"`` (``steps`` interpolation points); ``direction``:
    ``"denoising"`` (clean into corrupted) or ``"noising"`` (corrupted into clean; the papers'
    convention), see the module docstring; ``adapter``: an ``ii.Adapter`` by hand (with
    ``attn_norm``, ``qkv`` and, under a parallel residual, ``mlp_norm``) for a model whose
    family the architecture layer does not know (default: the family's map).

    >>> r = ii.edge_attribution(model, clean, corrupt, ii.logit_diff("Mary", "John"),
    ...                         method="eap-ig", steps=5)              # doctest: +SKIP
    >>> r.edges(3)                                                     # doctest: +SKIP
    >>> r.circuit(top=40).verify()                                     # doctest: +SKIP
    """
    start = time.perf_counter()
    method, steps = check_method(method, steps)
    if direction not in DIRECTIONS:
        raise InputError(f"direction must be one of {', '.join(map(repr, DIRECTIONS))}; got "
                         f"{direction!r}")
    model = wrap(model)
    warn_if_training(model)
    graph = build_graph(model, adapter)
    a, b = prepare_pair(model, clean, corrupted)
    bound = OnLogits(model, as_metric(metric), a.size, a.length)
    root = model.module
    base, source = (b, a) if direction == "denoising" else (a, b)
    source_writes, source_values = record(graph, root, {**source.kwargs, **bound.keep}, bound,
                                          check=True)
    base_writes, base_values, grads = _gradients(graph, root, {**base.kwargs, **bound.keep},
                                                 bound, source_writes[0], method, steps)
    per_prompt = edge_scores(graph, source_writes, base_writes, grads).cpu()
    scores = per_prompt.mean(0).masked_fill(~graph.upstream, float("nan"))
    clean_values, corrupt_values = ((source_values, base_values) if direction == "denoising"
                                    else (base_values, source_values))
    result = EdgeResult(graph, scores, per_prompt, method, steps if method == "eap-ig" else 1,
                        float(clean_values.mean()), float(corrupt_values.mean()),
                        repr(as_metric(metric)), time.perf_counter() - start,
                        inputs=(model, clean, corrupted, metric))
    result.direction = direction
    return result


def check_method(method: Any, steps: Any) -> tuple[str, int]:
    """``method`` and ``steps`` checked: ``"eap"`` / ``"eap-ig"``, a whole number >= 1."""
    if not isinstance(method, str) or method.lower() not in METHODS:
        raise InputError(f"method must be one of {', '.join(map(repr, METHODS))}; got "
                         f"{method!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise InputError(f"steps must be a whole number >= 1 (the interpolation points of "
                         f"EAP-IG); got {steps!r}")
    return method.lower(), steps


def _gradients(graph: Graph, root: nn.Module, kwargs: dict, bound: OnLogits,
               clean_embed: torch.Tensor, method: str,
               steps: int) -> tuple[Writes, torch.Tensor, list[torch.Tensor]]:
    """The base run's writes and metric, and the receivers' input gradients (averaged over
    the interpolation points for EAP-IG, from the base inputs towards ``clean_embed``, the
    source run's), as :func:`gradient_run` gives them."""
    total: list[torch.Tensor] = []
    first = None
    n = steps if method == "eap-ig" else 1
    for k in tqdm(range(n), desc="EAP-IG steps", delay=1.0, leave=False,
                  disable=n == 1 or progress_disabled()):
        embed = None if k == 0 else (
            lambda x, t=k / steps: x + t * (clean_embed.to(x.dtype) - x))
        writes, values, grads = gradient_run(graph, root, kwargs, bound, embed)
        if first is None:
            first = (writes, values)
        total = grads if not total else [t + g for t, g in zip(total, grads)]
        del grads
    assert first is not None
    return first[0], first[1], [t / n for t in total] if n > 1 else total


def gradient_run(graph: Graph, root: nn.Module, kwargs: dict, bound: OnLogits,
                 embed: Callable | None = None) -> tuple[Writes, torch.Tensor,
                                                         list[torch.Tensor]]:
    """One forward and one backward: the writes, the metric, and ``d sum(metric) / d
    input_v`` for every receiver, in float32, one ``[B, P, R_g, D]`` per group of receivers
    in receiver order (each layer's attention, each MLP, the logits)."""
    run = GraphRun(graph, root, grad=True, embed=embed)
    with torch.enable_grad(), HookSession() as session:
        run.install(session)
        values = bound(root(**kwargs).logits)
        if not isinstance(values, torch.Tensor) or not values.requires_grad:
            raise InputError("edge attribution differentiates the metric, but it returned a "
                             "value without a gradient (a Python float, or a tensor computed "
                             "with .item(), float(), .detach() or under torch.no_grad); "
                             "return a tensor computed from the logits")
        leaves = run.input_grads()
        grads = torch.autograd.grad(values.sum(), leaves, allow_unused=True)
    parts = [torch.zeros_like(leaf) if g is None else g for g, leaf in zip(grads, leaves)]
    parts = [(p if p.dim() == 4 else p[:, :, None]).float() for p in parts]
    return run.writes(), values.detach(), parts


def edge_scores(graph: Graph, clean: Writes, corrupted: Writes,
                grads: list[torch.Tensor]) -> torch.Tensor:
    """``[B, senders, receivers]``: ``(clean_u - corrupted_u) . grad_v`` (``clean``: the source
    run's writes, ``corrupted``: the base run's) summed over positions
    and d_model, for each prompt; 0 where u is not upstream of v. The senders upstream of a
    group of receivers are a prefix of the sender list: only those products are computed."""
    diff = torch.stack([c.float() - k.float() for c, k in zip(clean, corrupted)], 1)
    diff = diff.flatten(2)                                       # [B, S, P * D]
    scores = diff.new_zeros(diff.shape[0], len(graph.senders), len(graph.receivers))
    first = 0
    for part in grads:
        width = part.shape[2]
        n = _prefix(graph, first, width)
        flat = part.to(diff.device).permute(0, 1, 3, 2).reshape(diff.shape[0], -1, width)
        scores[:, :n, first:first + width] = torch.bmm(diff[:, :n], flat)
        first += width
    if first != len(graph.receivers):
        raise RuntimeError(f"internal: gradients for {first} of {len(graph.receivers)} receivers")
    return scores


def _prefix(graph: Graph, first: int, width: int) -> int:
    """How many senders (a prefix) are upstream of receivers ``first .. first + width``."""
    block = graph.upstream[:, first:first + width]
    n = int(block[:, 0].sum())
    if not (bool(block[:n].all()) and not bool(block[n:].any())):
        raise RuntimeError("internal: the senders upstream of a receiver group are not a "
                           "prefix of the sender list")
    return n
