"""AtP*'s terms for the inputs of a head: its queries, keys and values.

For one layer and one base run (patched into) and source run (patched from):

- **Q fix** (``q``): the pattern with the source's queries and the base's keys, recomputed
  exactly by the model's own eager attention (scaling, mask and softmax as in its forward),
  minus the base pattern, times ``d metric / d pattern``, summed over keys. Query rows are
  independent, so one attention call gives every query position and head at once.
- **K fix** (``k``): the same with the source's keys at one key position (``head_k_pos``:
  one call per key position, batched) or at every position (``head_k``: one call), summed
  over queries and keys, and over the query heads that share a kv head (GQA).
- **Linear** (``v``, and ``q``/``k`` without the fix): ``(source - base) . d metric / d x``.

Every function returns ``[passes, prompts, heads, cells_pos]``: one estimate per backward
pass (plain, then each GradDrop pass), per prompt, per head of the site's head axis (kv heads
for ``k`` and ``v``), per grid position (one summed column for the all-positions sites).

>>> terms = q_fix(module, call, base_values, source_q, pattern_grads)   # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ipy_intervene.errors import SiteError
from ipy_intervene.sweep.atp_runs import eager_pattern

ELEMENTS_PER_CHUNK = 1 << 24     # patterns recomputed together for the K fix (64 MB of floats)


def check_recompute(module: nn.Module, call: Any, base: dict[str, torch.Tensor],
                    layer: int) -> None:
    """The recorded pattern must come back from the recorded q, k: otherwise the model's
    attention is not the softmax of its eager function and the fix would be wrong."""
    again = eager_pattern(module, call, base["q"], base["k"], base["v"])
    if not torch.allclose(again.float(), base["pattern"].float(), atol=1e-6, rtol=0.0):
        gap = float((again.float() - base["pattern"].float()).abs().max())
        raise SiteError(
            f"AtP*'s QK fix recomputes layer {layer}'s attention pattern from its queries and "
            f"keys, but {type(module).__name__}'s eager attention does not give back the "
            f"pattern of the forward (largest gap {gap:.3g}). Use qk_fix=False (the linear "
            "q/k term) or method='activation' (exact)")


def linear(delta: torch.Tensor, grads: torch.Tensor, positions: list[int] | None) -> torch.Tensor:
    """``delta [B, H, P, d]`` . ``grads [n, B, H, P, d]`` per position (or summed)."""
    per_pos = (delta.float()[None] * grads.float()).sum(-1)          # [n, B, H, P]
    return _columns(per_pos, positions)


def q_fix(module: nn.Module, call: Any, base: dict[str, torch.Tensor], source_q: torch.Tensor,
          pattern_grads: torch.Tensor, positions: list[int] | None) -> torch.Tensor:
    """Each query row recomputed with the source's query: ``[n, B, H, cells_pos]``."""
    patched = eager_pattern(module, call, source_q.to(base["q"].dtype), base["k"], base["v"])
    change = patched.float() - base["pattern"].float()                 # [B, H, Pq, Pk]
    per_query = (change[None] * pattern_grads.float()).sum(-1)         # [n, B, H, Pq]
    return _columns(per_query, positions)


def chunk_positions(base: dict[str, torch.Tensor]) -> int:
    """Key positions whose patterns fit in :data:`ELEMENTS_PER_CHUNK` together."""
    return max(1, ELEMENTS_PER_CHUNK // max(1, base["pattern"].numel()))


def k_fix(module: nn.Module, call: Any, base: dict[str, torch.Tensor], source_k: torch.Tensor,
          pattern_grads: torch.Tensor, positions: list[int] | None,
          step: int | None = None) -> torch.Tensor:
    """The keys of one position (each of ``positions``), or all keys (None), recomputed:
    ``[n, B, kv_heads, cells_pos]``."""
    source_k = source_k.to(base["k"].dtype)
    if positions is None:
        patched = eager_pattern(module, call, base["q"], source_k, base["v"])
        return _per_kv_head(_against(patched, base, pattern_grads), base)
    batch = base["k"].shape[0]
    step = step or chunk_positions(base)
    columns = []
    for start in range(0, len(positions), step):
        chunk = positions[start:start + step]
        keys = base["k"].repeat(len(chunk), 1, 1, 1)                   # [c*B, kv, P, d]
        for i, pos in enumerate(chunk):
            keys[i * batch:(i + 1) * batch, :, pos] = source_k[:, :, pos]
        patched = eager_pattern(module, call, base["q"].repeat(len(chunk), 1, 1, 1), keys,
                                base["v"].repeat(len(chunk), 1, 1, 1))
        patched = patched.view(len(chunk), batch, *patched.shape[1:])  # [c, B, H, Pq, Pk]
        columns.append(_per_kv_head(_against(patched, base, pattern_grads), base))
    return torch.cat(columns, -1)


def _against(patched: torch.Tensor, base: dict[str, torch.Tensor],
             pattern_grads: torch.Tensor) -> torch.Tensor:
    """``(patched - base pattern) . grads`` summed over queries and keys:
    ``patched [..., B, H, Pq, Pk]`` -> ``[n, B, H, c]`` (c: the leading chunk axis)."""
    change = patched.float() - base["pattern"].float()
    if change.dim() == 4:
        change = change[None]
    return torch.einsum("cbhqk,nbhqk->nbhc", change, pattern_grads.float())


def _per_kv_head(per_head: torch.Tensor, base: dict[str, torch.Tensor]) -> torch.Tensor:
    """``[n, B, H, c]`` -> ``[n, B, kv, c]``: query heads summed into the kv head they read
    (GQA: query head h reads kv head ``h // (H / kv)``)."""
    n, batch, heads, c = per_head.shape
    kv = base["k"].shape[1]
    return per_head.view(n, batch, kv, heads // kv, c).sum(3)


def _columns(per_pos: torch.Tensor, positions: list[int] | None) -> torch.Tensor:
    """``[n, B, H, P]`` -> the grid's positions, or one column summed over all of them."""
    if positions is None:
        return per_pos.sum(-1, keepdim=True)
    return per_pos[..., positions]
