"""The prepared inputs of a sweep (:class:`SweepInputs`): which run is patched into (the base) and
which one the patched values come from (the source), the metric and the positions it reads.

>>> run = prepare(model, adapter, clean, corrupt, ii.logit_diff("Mary", "John"),
...               "activation", "denoising", None, 10, 3.0, None, 0)      # doctest: +SKIP
>>> run.base_is_clean, run.n_prompts                                       # doctest: +SKIP
(False, 2)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ipy_intervene.analysis.inputs import prepare_pair, subject_mask, subject_noise, token_labels
from ipy_intervene.analysis.metrics import Metric, Prob, as_metric
from ipy_intervene.analysis.reads import Reads, declared_reads, find_reads
from ipy_intervene.arch.sites import Adapter, get_path
from ipy_intervene.errors import InputError
from ipy_intervene.infra.hooks import entry_point
from ipy_intervene.model.envoys import Model


@dataclass
class SweepInputs:
    """The prepared inputs of a sweep: the base run (patched into) and the source run."""

    base_kwargs: dict[str, Any]
    source_kwargs: dict[str, Any]
    metric: Metric
    reads: Reads | None                      # None: found from the clean run (see settle)
    n_prompts: int
    labels: list[str]
    base_is_clean: bool = False              # noising: corrupted values into the clean run
    noise: torch.Tensor | None = None
    baselines: tuple[float, float] = (math.nan, math.nan)   # (clean, corrupted)
    interchange: Any = None    # custom sites: (base, source) -> the patched value (custom.py)

    @property
    def length(self) -> int:
        return int(self.base_kwargs["input_ids"].shape[1])

    @property
    def positions(self) -> list[int] | None:
        """The logit positions the metric reads (None: not known before the clean run)."""
        return None if self.reads is None else list(self.reads.positions)

    def bound(self, model: Model) -> Any:
        """The metric on logits at ``positions`` ``[rows, k, vocab]``."""
        return self.reads.feed(self.metric.bind(model, self.n_prompts))

    def settle(self, model: Model, clean: Any) -> None:
        """Find the metric's positions from the clean run's recording (made with every
        position's logits: ``positions`` was None) and keep its logits there only."""
        if self.reads is None:
            self.reads = find_reads(self.metric, self.metric.bind(model, self.n_prompts),
                                    clean.logits)
            clean.logits = clean.logits[:, self.positions]

    def set_baselines(self, base: float, source: float) -> None:
        """Record the metric of the base and source runs as (clean, corrupted)."""
        self.baselines = (base, source) if self.base_is_clean else (source, base)


def prepare(model: Model, adapter: Adapter, clean: Any, corrupted: Any, metric: Any,
             method: str, direction: str, subject: Any, samples: int, noise: float,
             noise_std: float | None, seed: int) -> SweepInputs:
    if method == "noise":
        return _prepare_noise(model, adapter, clean, metric, subject, samples, noise, noise_std,
                              seed)
    if corrupted is None:
        raise InputError(f"method={method!r} needs corrupted prompts (the run to patch into)")
    if metric is None:
        raise InputError("a sweep needs a metric, e.g. ii.logit_diff('Mary', 'John')")
    a, b = prepare_pair(model, clean, corrupted)
    metric = as_metric(metric)
    base, source = (b, a) if direction == "denoising" else (a, b)
    return SweepInputs(base.kwargs, source.kwargs, metric, declared_reads(metric, a.length), a.size,
               token_labels(model, a), base_is_clean=direction == "noising")


def _prepare_noise(model: Model, adapter: Adapter, clean: Any, metric: Any, subject: Any,
                   samples: int, noise: float, noise_std: float | None, seed: int) -> SweepInputs:
    batch = model.prepare([clean])
    mask = subject_mask(model, batch, subject)
    if samples < 1:
        raise InputError(f"samples={samples}: causal tracing needs at least one noised copy")
    embed = get_path(model.module, adapter.embed)
    embeddings = embed(batch.kwargs["input_ids"])
    std = noise_std if noise_std is not None else noise * float(
        embeddings[mask.to(embeddings.device)].std())
    if metric is None:  # ROME: the probability of the clean prediction
        logits = model.module(**batch.kwargs).logits[:, -1]
        metric = Prob(logits.argmax(-1).tolist())
    metric = as_metric(metric)
    base = {k: v.repeat(samples, *([1] * (v.dim() - 1))) for k, v in batch.kwargs.items()}
    noise_rows = subject_noise(mask, embeddings.shape[-1], samples, std, seed)
    return SweepInputs(base, batch.kwargs, metric, declared_reads(metric, batch.length), batch.size,
               token_labels(model, batch), noise=noise_rows.to(embeddings.device, embeddings.dtype))


class CellPatcher:
    """One grid cell's exact patched run, on demand, for the sweep view's detail panel;
    a sweep's patcher says how its engine is built (``engine()``) and which ``model``,
    ``grid`` (with ``shape``), ``run`` and ``_cells`` it has."""

    def engine(self, batch_size: int | None = None) -> Any:
        raise NotImplementedError

    @entry_point
    def probs(self, index: Any) -> torch.Tensor:
        """Next-token probabilities ``[prompts, vocab]`` at the last metric position under
        the patch of the cell at grid ``index`` (averaged over noise samples)."""
        flat = 0
        for i, size in zip(index, self.grid.shape):
            flat = flat * size + int(i)
        with torch.no_grad():
            logits = self.engine().cell_logits(self._cells[flat])[:, -1].float()
        probs = logits.softmax(-1)
        return probs.view(-1, self.run.n_prompts, probs.shape[-1]).mean(0)

    def top_tokens(self, index: Any, k: int = 5, prompt: int = 0) -> list[tuple[str, float]]:
        """The ``k`` likeliest next tokens of one prompt under one cell's patch."""
        top = self.probs(index)[prompt].topk(k)
        decode = self.model.tokenizer.decode if self.model.tokenizer is not None else str
        return [(decode([int(i)]), float(p)) for p, i in zip(top.values, top.indices)]
