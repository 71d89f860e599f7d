"""Influence, pruning, scores and top paths of an attribution graph (pure tensor functions
on its adjacency ``A[target, source]``).

Influence follows the papers: with ``N`` the adjacency's absolute values, each row
normalised to sum 1 (the share of a node's input each source gives), a node's influence on
the outputs is ``w @ (N + N^2 + N^3 + ...)``, ``w`` the outputs' weights (their
probabilities). The graph is acyclic (features read only earlier layers), so the series ends.

>>> influence(torch.tensor([[0., 0.], [1., 0.]]), torch.tensor([0., 1.]))
tensor([1., 0.])
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch

from ipy_intervene.errors import InputError


def normalized(adjacency: torch.Tensor) -> torch.Tensor:
    """``|A|`` with each row divided by its sum (rows that sum to 0 stay 0), in float32
    (the graphs of float64 models too)."""
    a = adjacency.abs().float()
    return a / a.sum(1, keepdim=True).clamp(min=1e-30)


def influence(adjacency: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``w @ (N + N^2 + ...)`` for ``N = normalized(adjacency)`` (a node's total share of
    the weighted outputs, through every path)."""
    n = normalized(adjacency)
    step = weights.float() @ n
    total = step.clone()
    for _ in range(n.shape[0] + 1):
        if not bool(step.any()):
            return total
        step = step @ n
        total += step
    raise InputError("the attribution graph has a cycle: influence does not converge")


def influence_from_rows(rows: torch.Tensor, owners: torch.Tensor, weights: torch.Tensor
                        ) -> torch.Tensor:
    """Influence over all sources when only some targets' rows are known: ``rows [R, S]``,
    ``owners[r]`` the source index of row ``r``'s node (-1 for an output), ``weights[r]``
    the output weight of row ``r``. A source whose row is unknown is a leaf."""
    n = normalized(rows)
    is_source = owners >= 0
    step = weights.float() @ n
    total = step.clone()
    for _ in range(rows.shape[0] + 1):
        carried = torch.zeros(rows.shape[0])
        carried[is_source] = step[owners[is_source]]
        if not bool(carried.any()):
            break
        step = carried @ n
        total += step
    return total


def threshold_mask(scores: torch.Tensor, share: float) -> torch.Tensor:
    """The biggest scores that together make ``share`` of their sum (ties kept)."""
    if not 0.0 <= share <= 1.0:
        raise InputError(f"a pruning threshold is a share of the influence, in [0, 1]; got "
                         f"{share!r}")
    flat = scores.flatten()
    if flat.numel() == 0 or float(flat.sum()) <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    ordered = flat.sort(descending=True).values
    cum = ordered.cumsum(0) / ordered.sum()
    cut = min(int(torch.searchsorted(cum, torch.tensor(share, dtype=cum.dtype))),
              len(ordered) - 1)
    return scores >= ordered[cut]


@dataclass
class Pruned:
    node_mask: torch.Tensor
    edge_mask: torch.Tensor
    node_influence: torch.Tensor


def prune(adjacency: torch.Tensor, weights: torch.Tensor, n_features: int, n_errors: int,
          node_threshold: float = 0.8, edge_threshold: float = 0.98) -> Pruned:
    """Keep the features carrying ``node_threshold`` of the influence (errors too; tokens
    and outputs always), then the edges carrying ``edge_threshold`` of the influence through
    what is left; drop nodes left without edges, until nothing changes."""
    n = adjacency.shape[0]
    node_inf = influence(adjacency, weights)
    node_mask = threshold_mask(node_inf, node_threshold)
    n_inner = n_features + n_errors
    fixed = torch.zeros(n, dtype=torch.bool)
    fixed[n_inner:] = True                      # tokens and outputs
    node_mask |= fixed
    kept = adjacency.clone()
    kept[~node_mask] = 0
    kept[:, ~node_mask] = 0
    carried = influence(kept, weights) + weights.float()
    edge_mask = threshold_mask(normalized(kept) * carried[:, None], edge_threshold)
    edge_mask &= kept != 0
    while True:
        before = node_mask.clone()
        edge_mask[~node_mask] = False
        edge_mask[:, ~node_mask] = False
        node_mask[:n_inner] &= edge_mask[:, :n_inner].any(0)    # something reads it
        node_mask[:n_features] &= edge_mask[:n_features].any(1)  # it reads something
        if torch.equal(before, node_mask):
            return Pruned(node_mask, edge_mask, node_inf)


def scores(adjacency: torch.Tensor, weights: torch.Tensor, error_span: tuple[int, int],
           token_span: tuple[int, int]) -> tuple[float, float]:
    """(replacement score, completeness score): the share of the outputs' influence that
    reaches the tokens without passing through an error node, and the influence-weighted
    share of each node's input that does not come straight from error nodes."""
    n = normalized(adjacency)
    inf = influence(adjacency, weights)
    e0, e1 = error_span
    t0, t1 = token_span
    from_tokens, from_errors = float(inf[t0:t1].sum()), float(inf[e0:e1].sum())
    replacement = from_tokens / max(from_tokens + from_errors, 1e-30)
    has_input = n.sum(1) > 0
    clean = torch.where(has_input, 1 - n[:, e0:e1].sum(1), torch.zeros(()))
    reach = (inf + weights.float()) * has_input
    completeness = float((clean * reach).sum() / reach.sum().clamp(min=1e-30))
    return replacement, completeness


def top_paths(adjacency: torch.Tensor, weights: torch.Tensor, sources: list[int], k: int = 5
              ) -> list[tuple[float, list[int]]]:
    """The ``k`` paths from any of ``sources`` to an output with the largest product of
    normalised edge shares times the output's weight: ``[(score, [node, ..., output])]``."""
    n = normalized(adjacency)
    best: dict[int, list[tuple[float, list[int]]]] = {}
    outputs = [i for i in range(len(weights)) if float(weights[i]) > 0]
    for out in outputs:
        for score, path in _best_into(n, out, set(sources), k, best):
            best.setdefault(-1, []).append((score * float(weights[out]), path + [out]))
    found = best.get(-1, [])
    return heapq.nlargest(k, found, key=lambda item: item[0])


def _best_into(n: torch.Tensor, node: int, sources: set[int], k: int,
               memo: dict[int, list[tuple[float, list[int]]]]) -> list[tuple[float, list[int]]]:
    """The k best paths from a source into ``node`` (not including ``node``)."""
    if node in memo:
        return memo[node]
    row = n[node]
    parents = row.nonzero().flatten().tolist()
    found: list[tuple[float, list[int]]] = []
    for parent in parents:
        share = float(row[parent])
        if parent in sources:
            found.append((share, [parent]))
        else:
            found += [(share * s, p + [parent]) for s, p in _best_into(n, parent, sources, k,
                                                                       memo)]
    memo[node] = heapq.nlargest(k, found, key=lambda item: item[0])
    return memo[node]
