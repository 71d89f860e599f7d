"""The plain-hooks pieces of the edge-attribution oracles (tests/test_edges.py,
tests/test_edges_families.py): module paths, hook handles removed on exit, the receivers
under the package's naming and EAP's closed form. A ``hand`` is each file's ``Hand``: it
knows a model's layers (``n``), heads (``H``) and kv heads (``KV``)."""

from __future__ import annotations

from contextlib import contextmanager

import torch

from conftest import hook_count


def get(root, path):
    for part in path.split("."):
        root = getattr(root, part)
    return root


@contextmanager
def plain(*handles):
    """Plain torch hook handles, removed on exit."""
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def pre_add(module, fn):
    """A forward pre-hook: first argument -> fn(first argument)."""
    return module.register_forward_pre_hook(lambda m, args: (fn(args[0]), *args[1:]))


def hook_free(root):
    return hook_count(root) == 0


def receivers(hand):
    """[(name, kind, layer, index)] with the package's naming."""
    names = []
    kv = (lambda l, g: f"L{l}H{g}") if hand.KV == hand.H else (lambda l, g: f"L{l}KV{g}")
    for l in range(hand.n):
        names += [(f"L{l}H{h}.q", "q", l, h) for h in range(hand.H)]
        names += [(f"{kv(l, g)}.{t}", t, l, g) for t in "kv" for g in range(hand.KV)]
        names.append((f"MLP{l}", "mlp", l, -1))
    return names + [("logits", "logits", hand.n, -1)]


def scores_by_hand(grads, clean, corrupt, graph):
    """EAP's closed form: (clean - corrupted write of the sender) . d metric / d receiver
    input, for every upstream pair of ``graph``; NaN elsewhere."""
    want = torch.full((len(graph.senders), len(graph.receivers)), float("nan"))
    for s, send in enumerate(graph.senders):
        for r, recv in enumerate(graph.receivers):
            if bool(graph.upstream[s, r]):
                diff = clean[send.name] - corrupt[send.name]
                want[s, r] = (diff * grads[recv.name]).sum((1, 2)).mean()
    return want
