"""Attribution graphs (Ameisen et al. 2025, "Circuit Tracing"): for one prompt, the exact
direct effects, in the frozen local replacement model (:mod:`.replacement`), of every active
transcoder feature, every error node and every token embedding on every later feature's
pre-activation and on the output logits.

>>> import ipy_intervene as ii
>>> model = ii.load_model("demo")
>>> g = ii.attribution_graph(model, "The Thuzor Quenosk Fountain is in the city of",
...                          transcoders="demo")                             # doctest: +SKIP
>>> g                                                                        # doctest: +SKIP
AttributionGraph(13 tokens, 412 features, 52 errors, 3 logits; replacement 0.71, ...)

Nodes, in this order: features ``f{layer}.{pos}.{latent}`` (sorted by layer, position,
latent), errors ``e{layer}.{pos}`` (what the transcoder misses there), token embeddings
``t{pos}`` (the residual stream entering block 0: token and position embeddings), logits
``logit:{token id}`` (logit minus the mean logit over the vocabulary: softmax's invariant
part removed; the family's logit scale applied, before any final soft-cap) or ``logit:diff`` for an ``ii.logit_diff`` target.
``adjacency[t, s]`` is the direct effect of ``s`` on the input of ``t`` (a feature's encoder
pre-activation, a logit's value): a feature's ``activation * (decoder row . gradient)``.

Rows are computed by backward passes of the frozen model run on ``batch_size`` copies of the
prompt: each copy carries one target, so one backward gives ``batch_size`` rows, and the
retained forward serves every chunk (memory grows with ``batch_size``, not with the graph).
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
from tqdm.auto import tqdm

from ipy_intervene.arch.sites import Adapter, adapter_for, get_path
from ipy_intervene.circuit.graph_prune import influence_from_rows
from ipy_intervene.circuit.graph_result import AttributionGraph, Nodes
from ipy_intervene.circuit.replacement import (Recording, frozen, record, unembedded,
                                               wide_dtype)
from ipy_intervene.errors import InputError
from ipy_intervene.features.clt import Replacement
from ipy_intervene.features.transcoders import check_replacement
from ipy_intervene.infra.hooks import edit_names, entry_point
from ipy_intervene.infra.progress import progress_disabled
from ipy_intervene.model.encode import encode
from ipy_intervene.model.loading import wrap


@entry_point
def attribution_graph(model: Any, prompt: Any, transcoders: Any, *, target: Any = None,
                      logit_share: float = 0.95, max_logits: int = 10,
                      max_feature_nodes: int | None = None, batch_size: int = 32,
                      adapter: Adapter | None = None) -> AttributionGraph:
    """The attribution graph of ``prompt`` (a string or 1-D token ids) with one transcoder
    per MLP (``transcoders``: a dict or list by layer, a folder, or ``"demo"``) or a
    cross-layer transcoder (a ``CrossLayerTranscoder`` or a folder in circuit-tracer's
    layout, :mod:`ipy_intervene.features.clt`), whose features then have edges through
    each of their decoders.

    ``target``: None (the logits covering ``logit_share`` of the next-token probability, at
    most ``max_logits``), a token or list of tokens (str or id), or ``ii.logit_diff(a, b)``
    (one output node). ``max_feature_nodes``: expand at most this many features, chosen by
    their influence on the target as rows come in (the others stay out of the graph; their
    edges into kept nodes are in ``dropped_in``). ``batch_size``: rows per backward.

    >>> g = ii.attribution_graph(model, prompt, "demo", target=ii.logit_diff("Mary", "John"))
    >>> g.prune().top_paths(3)                                           # doctest: +SKIP
    """
    model = wrap(model) if not hasattr(model, "module") else model
    adapter = adapter_for(model, adapter)
    adapter.require_summed("an attribution graph")
    if edit_names(model.module):
        raise InputError(f"an attribution graph freezes the model's own parts from one forward "
                         f"and does not run the edits {edit_names(model.module)} (ii.edit) "
                         "on them: build it on the model they were made from")
    module = model.module
    ids = _prompt_ids(model, prompt)
    d_model = int(get_path(module, adapter.unembed).weight.shape[1])
    tcs = check_replacement(transcoders, adapter.n_layers, d_model,
                            f"this {adapter.name} model")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size={batch_size!r}: expected a positive int")
    rec = record(module, adapter, ids.to(model.device))
    nodes, acts = _nodes(model, rec, tcs, target, logit_share, max_logits)
    builder = _Builder(module, adapter, rec, tcs, acts, nodes, batch_size)
    expanded = builder.expand(max_feature_nodes)
    graph = builder.graph(expanded)
    graph._context = dict(model=model, adapter=adapter, rec=rec, transcoders=tcs, acts=acts)
    return graph


def _prompt_ids(model: Any, prompt: Any) -> torch.Tensor:
    if isinstance(prompt, (list, tuple)) and not all(isinstance(p, int) for p in prompt):
        raise InputError("attribution_graph traces one prompt (a string or token ids); call "
                         "it once per prompt")
    ids = encode(model, prompt, None)["input_ids"]
    if ids.shape[0] != 1:
        raise InputError(f"attribution_graph traces one prompt; got a batch of {ids.shape[0]}")
    limit = model.max_length
    if limit is not None and ids.shape[1] > limit:
        raise InputError(f"the prompt is {ids.shape[1]} tokens; this model has {limit} "
                         "positions")
    return ids


def _nodes(model: Any, rec: Recording, tcs: Replacement, target: Any, share: float,
           max_logits: int) -> tuple[Nodes, dict[int, torch.Tensor]]:
    acts = {layer: tcs.encode(layer, rec.mlp_in[layer]).detach()
            for layer in range(tcs.n_layers)}
    feats = []
    for layer in sorted(acts):
        pos, latent = acts[layer].nonzero(as_tuple=True)
        for p, f in zip(pos.tolist(), latent.tolist()):
            feats.append((layer, p, f, float(acts[layer][p, f])))
    tokens = [model.tokenizer.decode([t]) if model.tokenizer is not None else str(t)
              for t in rec.input_ids[0].tolist()]
    logits, probs, vectors = _logit_nodes(model, rec, target, share, max_logits)
    return Nodes(feats, tcs.n_layers, len(tokens), tokens, logits, probs, vectors), acts


def _logit_nodes(model: Any, rec: Recording, target: Any, share: float, max_logits: int
                 ) -> tuple[list[str], torch.Tensor, list[tuple[int, int | None]]]:
    """Labels, weights and (token, minus token) of the output nodes."""
    probs = torch.softmax(rec.logits.float(), -1)
    if target is None:
        if not 0 < share <= 1 or max_logits < 1:
            raise InputError(f"logit_share={share!r} must be in (0, 1] and max_logits="
                             f"{max_logits!r} at least 1")
        top = probs.topk(min(max_logits, probs.numel()))
        keep = int(torch.searchsorted(top.values.cumsum(0), torch.tensor(share))) + 1
        ids = top.indices[:keep].tolist()
        return ([_tok(model, i) for i in ids], probs[ids], [(i, None) for i in ids])
    if type(target).__name__ == "LogitDiff":
        good, bad = (_token(model, a) for a in target.answers)
        return ([f"{_tok(model, good)} - {_tok(model, bad)}"], torch.ones(1), [(good, bad)])
    items = [target] if isinstance(target, (str, int)) else list(target)
    ids = [_token(model, item) for item in items]
    return [_tok(model, i) for i in ids], probs[ids] / probs[ids].sum(), [(i, None) for i in ids]


def _token(model: Any, item: Any) -> int:
    if isinstance(item, (list, tuple)):
        if len(item) != 1:
            raise InputError(f"one answer per output node; got {item!r}")
        item = item[0]
    return item if isinstance(item, int) else model.token_id(item)


def _tok(model: Any, i: int) -> str:
    return model.tokenizer.decode([i]) if model.tokenizer is not None else str(i)


class _Builder:
    """Rows of the adjacency, ``batch_size`` per backward of one retained frozen forward."""

    def __init__(self, module: Any, adapter: Adapter, rec: Recording, tcs: Replacement,
                 acts: dict[int, torch.Tensor], nodes: Nodes, batch_size: int) -> None:
        self.module, self.adapter, self.rec, self.tcs = module, adapter, rec, tcs
        self.acts, self.nodes, self.batch = acts, nodes, batch_size
        self.rows: dict[tuple, torch.Tensor] = {}     # target key -> row over all sources
        self.errors = {layer: (rec.mlp_out[layer] - tcs.decode(layer, acts)).detach()
                       for layer in range(tcs.n_layers)}

    def expand(self, max_features: int | None) -> list[int]:
        """Compute the logit rows, then feature rows (all, or the most influential up to
        ``max_features``); returns the expanded features' indices."""
        n_feat = len(self.nodes.features)
        limit = n_feat if max_features is None else min(int(max_features), n_feat)
        logit_keys = [("logit", i) for i in range(len(self.nodes.logits))]
        bar = tqdm(total=limit + len(logit_keys), desc="attribution graph",
                   disable=progress_disabled() or limit + len(logit_keys) < 4 * self.batch)
        with self._forward() as rows_of:
            for chunk in _chunks(logit_keys, self.batch):
                self._store(chunk, rows_of(chunk), bar)
            done: list[int] = []
            while len(done) < limit:
                pending = self._next_features(done, limit)
                self._store([("feature", i) for i in pending],
                            rows_of([("feature", i) for i in pending]), bar)
                done += pending
        bar.close()
        return sorted(done)

    def _next_features(self, done: list[int], limit: int) -> list[int]:
        n_feat = len(self.nodes.features)
        want = min(self.batch, limit - len(done))
        if limit == n_feat:
            return list(range(len(done), len(done) + want))
        keys = list(self.rows)
        rows = torch.stack([self.rows[k] for k in keys])
        owners = torch.tensor([k[1] if k[0] == "feature" else -1 for k in keys])
        weights = torch.tensor([float(self.nodes.weights[k[1]]) if k[0] == "logit" else 0.0
                                for k in keys])
        score = influence_from_rows(rows, owners, weights)[:n_feat]
        score[done] = -1.0
        return score.topk(want).indices.sort().values.tolist()

    def _store(self, keys: list[tuple], rows: torch.Tensor, bar: Any) -> None:
        for key, row in zip(keys, rows):
            self.rows[key] = row
        bar.update(len(keys))

    def _forward(self):
        return _RowsOf(self)

    def graph(self, expanded: list[int]) -> AttributionGraph:
        """The square adjacency over expanded features, errors, tokens and logits."""
        nodes = self.nodes
        n_feat = len(nodes.features)
        keep_cols = torch.tensor(expanded + list(range(n_feat, nodes.n_sources)),
                                 dtype=torch.long)
        dropped = torch.ones(nodes.n_sources, dtype=torch.bool)
        dropped[keep_cols] = False
        n_src, n_out = len(keep_cols), len(nodes.logits)
        dtype = next(iter(self.rows.values())).dtype
        adj = torch.zeros(n_src + n_out, n_src + n_out, dtype=dtype)
        dropped_in = torch.zeros(n_src + n_out, dtype=torch.float64)
        targets = [("feature", i) for i in expanded] + \
                  [("logit", i) for i in range(n_out)]
        where = list(range(len(expanded))) + list(range(n_src, n_src + n_out))
        for key, r in zip(targets, where):
            row = self.rows[key]
            adj[r, :n_src] = row[keep_cols]
            dropped_in[r] = row[dropped].double().sum()
        values, bias = self._values(targets)
        return AttributionGraph(nodes.subset(expanded), adj, torch.tensor(where), values,
                                bias, dropped_in)

    @torch.no_grad()
    def _values(self, targets: list[tuple]) -> tuple[torch.Tensor, torch.Tensor]:
        """Each target's input in the frozen model (all sources), and with every source
        removed (features, errors and embeddings zero: the biases alone)."""
        from ipy_intervene.circuit.graph_intervene import frozen_values

        rec, tcs = self.rec, self.tcs
        full = frozen_values(self.module, self.adapter, rec, tcs, self.nodes, targets)
        zero_acts = {layer: torch.zeros_like(a) for layer, a in self.acts.items()}
        bias = frozen_values(self.module, self.adapter, rec, tcs, self.nodes, targets,
                             acts=zero_acts, error_scale=0.0, embed_scale=0.0)
        return full, bias


class _RowsOf:
    """The retained batched forward; ``rows_of(keys)`` gives one row per target key."""

    def __init__(self, builder: _Builder) -> None:
        self.b = builder
        self.leaves: dict[Any, torch.Tensor] = {}
        self.inputs: dict[int, torch.Tensor] = {}
        self.seen: dict[str, Any] = {}

    def __enter__(self):
        b = self.b
        batch = min(b.batch, len(b.nodes.features) + len(b.nodes.logits))
        self.batch = batch

        def mlp(layer: int, x: torch.Tensor) -> torch.Tensor:
            self.inputs[layer] = x
            leaf = b.rec.mlp_out[layer].expand(batch, -1, -1).clone().requires_grad_(True)
            self.leaves[layer] = leaf
            return leaf

        def embed(x: torch.Tensor) -> torch.Tensor:
            leaf = b.rec.emb.expand(batch, -1, -1).clone().requires_grad_(True)
            self.leaves["emb"] = leaf
            return leaf

        self.grad = torch.enable_grad()
        self.grad.__enter__()
        self.ctx = frozen(b.module, b.adapter, b.rec, mlp=mlp, embed=embed, seen=self.seen)
        run = self.ctx.__enter__()
        run(batch)
        return self.rows_of

    def __exit__(self, *exc: Any) -> None:
        self.leaves.clear()
        self.inputs.clear()
        self.seen.clear()
        self.ctx.__exit__(*exc)
        self.grad.__exit__(*exc)

    def rows_of(self, keys: list[tuple]) -> torch.Tensor:
        out = []
        for chunk in _chunks(keys, self.batch):
            out.append(self._chunk(chunk))
        return torch.cat(out) if out else torch.zeros(0, self.b.nodes.n_sources)

    def _chunk(self, keys: list[tuple]) -> torch.Tensor:
        b, nodes = self.b, self.b.nodes
        total = 0
        for i, (kind, index) in enumerate(keys):
            if kind == "feature":
                layer, pos, latent, _ = nodes.features[index]
                w = b.tcs.encoder(layer)[:, latent]
                total = total + self.inputs[layer][i, pos].to(w.dtype) @ w
            else:
                total = total + _logit_value(b, self.seen["final"][i, -1], index)
        order = ["emb", *range(b.adapter.n_layers)]
        grads = torch.autograd.grad(total, [self.leaves[k] for k in order], retain_graph=True,
                                    allow_unused=True, materialize_grads=True)
        return columns(nodes, b.tcs, b.rec.emb, b.errors, dict(zip(order, grads)))[:len(keys)]


def _logit_value(builder: _Builder, final: torch.Tensor, index: int) -> torch.Tensor:
    logits = unembedded(builder.module, builder.adapter, final)
    good, bad = builder.nodes.vectors[index]
    return logits[good] - (logits.mean() if bad is None else logits[bad])


def columns(nodes: Nodes, tcs: Replacement, emb: torch.Tensor,
            errors: dict[int, torch.Tensor], grads: dict[Any, torch.Tensor]) -> torch.Tensor:
    """Direct effects ``[batch, n_sources]`` from the gradients at each MLP output and at
    block 0's input: features ``act * sum over their decoders of (grad at the decoder's
    layer . decoder row)``, errors ``grad . error``, tokens ``grad . embedding``."""
    batch = grads["emb"].shape[0]
    out = torch.zeros(batch, nodes.n_sources, dtype=wide_dtype(grads["emb"]))
    for layer, (start, stop) in nodes.layer_spans().items():
        if start == stop:
            continue
        pos = torch.tensor([nodes.features[i][1] for i in range(start, stop)])
        lat = torch.tensor([nodes.features[i][2] for i in range(start, stop)])
        proj = 0
        for target in tcs.targets(layer):
            w = tcs.decoder(layer, target)[lat].detach()                 # [n, d]
            full = torch.einsum("btd,nd->btn", grads[target].to(w.dtype), w)
            proj = proj + full[:, pos, torch.arange(stop - start)]
        act = torch.tensor([nodes.features[i][3] for i in range(start, stop)],
                           dtype=proj.dtype)
        out[:, start:stop] = (proj * act).to(out.dtype)
    err0, tok0 = nodes.error_start, nodes.token_start
    for layer, err in errors.items():
        dot = (grads[layer] * err.to(grads[layer].dtype)).sum(-1)
        out[:, err0 + layer * nodes.n_pos: err0 + (layer + 1) * nodes.n_pos] = dot.to(out.dtype)
    out[:, tok0:tok0 + nodes.n_pos] = (grads["emb"] * emb).sum(-1).to(out.dtype)
    return out


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]
