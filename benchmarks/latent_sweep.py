"""A sweep over SAE latents: the batched latent sweep (``ii.patch_sweep(site="sae")``)
against a loop of one ``ii.trace`` per latent, on the demo model with the demo SAE at block
2's output (``ii.load_sae("demo")``; a random SAE of the same size, 512 latents, where it is
not shipped yet), 256 latents at the last position, IOI prompts.

Both give the same numbers, and those of a plain-hooks loop doing the splice's arithmetic by
hand (checked here); the ratio is printed (the batched sweep's best
of 3 runs against one pass of the loop). The batched sweep
skips a latent whose clean and corrupted values are equal bit for bit (off in both runs:
most of an SAE's latents), and ``--no-skip`` times it with every cell run (a dense random
SAE), so the ratio is shown both ways.

    python benchmarks/latent_sweep.py [--device cuda] [--latents 256] [--prompts 1]
"""

from __future__ import annotations

import argparse
import time

import torch

import ipy_intervene as ii
from ipy_intervene.features import SAE

CLEAN = "When Mary and John went to the store , John gave a drink to"
CORRUPT = "When Mary and John went to the store , Mary gave a drink to"
LOOP = """
model.transformer.h[2].sae.latents.output[:, -1, j] = value
logits = model.lm_head.output
score = logits[:, -1, good] - logits[:, -1, bad]
"""


def demo_sae(model: ii.Model, dense: bool):
    if not dense:
        try:
            return ii.load_sae("demo", device=model.device), "demo SAE"
        except ii.errors.InputError:
            pass
    gen = torch.Generator().manual_seed(0)
    d = model.config.n_embd
    sae = SAE(d, 512, apply_b_dec_to_input=False)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d, 512, generator=gen) / d ** 0.5)
        sae.b_enc.copy_(torch.randn(512, generator=gen) * 0.1 + (0.0 if dense else -0.5))
        sae.W_dec.copy_(torch.randn(512, d, generator=gen) / 512 ** 0.5)
    return sae.to(model.device), "random SAE" + (" (dense: every latent on)" if dense else "")


def timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def loop(model, clean_latents, latents, good, bad):
    """One trace per latent, each setting that latent at the last position to its clean
    value in the corrupted run."""
    out = []
    for j in latents:
        ns = {"j": j, "value": clean_latents[:, -1, j], "good": good, "bad": bad}
        ii.trace(model, LOOP, CORRUPT, namespace=ns)
        out.append(float(ns["score"].mean()))
    return torch.tensor(out)


@torch.no_grad()
def hooks_loop(model, sae, latents, good, bad):
    """The referee: one plain forward per latent with a hook on block 2 doing the splice's
    arithmetic by hand (no ipy_intervene code on the path)."""
    module, block = model.module, model.module.transformer.h[2]
    ids = {t: model.tokenizer(t, return_tensors="pt").input_ids.to(model.device)
           for t in (CLEAN, CORRUPT)}
    seen = {}
    handle = block.register_forward_hook(lambda m, a, o: seen.__setitem__("x", o[0] if
                                                                          isinstance(o, tuple)
                                                                          else o))
    try:
        module(input_ids=ids[CLEAN])
    finally:
        handle.remove()
    clean = sae.encode(seen["x"])
    out = []
    for j in latents:
        def hook(m, a, o, j=j):
            x = o[0] if isinstance(o, tuple) else o
            lat = sae.encode(x)
            lat2 = lat.clone()
            lat2[:, -1, j] = clean[:, -1, j]
            new = sae.decode(lat2) + (x - sae.decode(lat))
            return (new, *o[1:]) if isinstance(o, tuple) else new
        handle = block.register_forward_hook(hook)
        try:
            logits = module(input_ids=ids[CORRUPT]).logits
        finally:
            handle.remove()
        out.append(float(logits[0, -1, good] - logits[0, -1, bad]))
    return torch.tensor(out)


def run(model, latents: int, dense: bool, device: str) -> None:
    sae, name = demo_sae(model, dense)
    good, bad = model.token_id("Mary"), model.token_id("John")
    chosen = list(range(latents))
    (referee, t_hooks) = timed(lambda: hooks_loop(model, sae, chosen, good, bad))
    ii.attach(model, model.transformer.h[2], sae)
    try:
        ns: dict = {}
        ii.trace(model, "lat = model.transformer.h[2].sae.latents.output", CLEAN, namespace=ns)
        metric = ii.logit_diff("Mary", "John")
        sweep = lambda: ii.patch_sweep(model, CLEAN, CORRUPT, metric, site="sae",  # noqa: E731
                                       latents=chosen, positions=[-1])
        sweep()                                     # warm-up (kernels, block capture)
        runs = [timed(sweep) for _ in range(3)]     # the best of 3: the machine is shared
        batched, t_batched = min(runs, key=lambda r: r[1])
        naive, t_loop = timed(lambda: loop(model, ns["lat"], chosen, good, bad))
    finally:
        ii.detach(model)
    gap = float((batched.raw[:, 0] - naive).abs().max())
    hooks_gap = float((batched.raw[:, 0] - referee).abs().max())
    on = int((batched.raw[:, 0] != batched.corrupted).sum())
    print(f"{name}, {latents} latents x last position ({on} move the metric), {device}:")
    print(f"  batched sweep {t_batched * 1e3:8.1f} ms   trace loop {t_loop * 1e3:8.1f} ms   "
          f"ratio {t_loop / t_batched:6.1f}x   largest gap {gap:.1e}")
    print(f"  plain-hooks loop {t_hooks * 1e3:8.1f} ms (ratio {t_hooks / t_batched:6.1f}x), "
          f"largest gap to the batched sweep {hooks_gap:.1e}")
    assert max(gap, hooks_gap) < 1e-4, "the batched sweep, the trace loop and hooks disagree"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--latents", type=int, default=256)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = ii.load_model("demo")
    model.module.to(args.device)
    for dense in (False, True):
        run(model, args.latents, dense, args.device)


if __name__ == "__main__":
    main()
