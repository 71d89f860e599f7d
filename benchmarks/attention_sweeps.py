"""Sweeps inside attention: a per-head pattern sweep and path patching, ours vs naive loops.

    python benchmarks/attention_sweeps.py [--layers 12 --width 768] [--device cuda]

On a GPT-2-small-shaped model (random weights) with an IOI-shaped batch (8 prompts x 15
tokens; the corrupted prompts differ at one position), in one process:

- head pattern sweep: ``head_sweep(site="head_pattern")`` vs the naive loop, one forward per
  (layer, head) whose hook replaces that head's pattern (what TransformerLens's
  ``get_act_patch_attn_head_pattern_all_pos`` does);
- path patching to the logits: ``ii.path_patch`` vs the naive loop, one forward per sender
  head with every other head's output frozen (the IOI notebook's loop);

and prints the speed-up of each (ours / naive in the same run) and the largest difference.
"""

from __future__ import annotations

import time

import torch
import ipy_intervene as ii
from ipy_intervene.arch import attention
from ipy_intervene.sweep.heads import head_sweep
from ipy_intervene.infra.hooks import HookSession, tap
from shapes import arguments, gpt2_ioi


def seconds(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


@torch.no_grad()
def naive_pattern_sweep(model, clean, corrupt, metric) -> torch.Tensor:
    """One forward per (layer, head): that head's clean pattern in the corrupted run."""
    blocks = model.module.transformer.h
    points = [attention.point(b.attn, "pattern") for b in blocks]
    kept = {}
    with HookSession() as session:
        attention.use_sites(session, model.module)
        for i, p in enumerate(points):
            tap(session, p, False, lambda x, i=i: kept.__setitem__(i, x.clone()))
        model.module(clean)
    out = torch.empty(len(blocks), model.config.n_head)
    for layer, point in enumerate(points):
        for head in range(model.config.n_head):
            def patch(x, layer=layer, head=head):
                x = x.clone()
                x[:, head] = kept[layer][:, head]
                return x
            with HookSession() as session:
                attention.use_sites(session, model.module)
                tap(session, point, False, patch)
                out[layer, head] = metric(model.module(corrupt).logits).mean().item()
    return out


@torch.no_grad()
def naive_path_patch(model, clean, corrupt, metric) -> torch.Tensor:
    """One forward per sender: every head's output frozen at clean but the sender's."""
    blocks = model.module.transformer.h
    heads = model.config.n_head

    def z_of(ids):
        kept = {}
        hs = [b.attn.c_proj.register_forward_pre_hook(
            lambda m, a, i=i: kept.__setitem__(i, a[0].clone())) for i, b in enumerate(blocks)]
        model.module(ids)
        for h in hs:
            h.remove()
        return kept

    zc, zx = z_of(clean), z_of(corrupt)
    out = torch.empty(len(blocks), heads)
    for layer in range(len(blocks)):
        for head in range(heads):
            def freeze(m, a, i, layer=layer, head=head):
                z = zc[i].clone()
                if i == layer:
                    d = z.shape[-1] // heads
                    z[..., head * d:(head + 1) * d] = zx[i][..., head * d:(head + 1) * d]
                return (z,)
            hs = [b.attn.c_proj.register_forward_pre_hook(
                lambda m, a, i=i: freeze(m, a, i)) for i, b in enumerate(blocks)]
            out[layer, head] = metric(model.module(clean).logits).mean().item()
            for h in hs:
                h.remove()
    return out


def main() -> None:
    args = arguments(__doc__.splitlines()[0]).parse_args()
    setup = gpt2_ioi(args)
    model, clean, corrupt, metric, device = (setup.model, setup.clean, setup.corrupt,
                                             setup.metric, setup.device)
    bound = metric.bind(model, args.prompts)
    with torch.no_grad():
        model.module(clean)  # warm up
    print(f"GPT-2 shape {args.layers} layers x {args.width}, {model.config.n_head} heads, batch "
          f"{args.prompts} x {args.tokens} tokens, {device}, {torch.get_num_threads()} threads")
    for name, ours_fn, naive_fn in [
        ("head_pattern sweep", lambda: head_sweep(model, clean, corrupt, metric,
                                                  site="head_pattern").raw,
         lambda: naive_pattern_sweep(model, clean, corrupt, bound)),
        ("path patching -> logits", lambda: ii.path_patch(model, clean, corrupt, metric).raw,
         lambda: naive_path_patch(model, clean, corrupt, bound)),
    ]:
        ours, got = seconds(ours_fn)
        naive, expected = seconds(naive_fn)
        error = float((got - expected).abs().max())
        print(f"{name:24s} ours {ours:7.2f} s   naive {naive:7.2f} s   "
              f"speed-up {naive / ours:5.2f}x   max |ours - naive| = {error:.1e}")
        assert error < 1e-3, f"{name}: ours and the naive loop disagree"


if __name__ == "__main__":
    main()
