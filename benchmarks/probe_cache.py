"""A linear probe over 2,000 prompts x every layer, from one ``ii.cache`` call, against the
naive way (a loop of one forward per prompt with a hook on each block), measured in the same
run on the demo model (the cache: median of 3 runs; the loop: one run). The probe: does the last token's residual stream say which name is
repeated (the subject: the first or the second name)? Ridge regression per layer, fitted on
1,500 prompts, scored on 500.

    python benchmarks/probe_cache.py [--prompts 2000] [--batch-size 64] [--device cuda]
"""

from __future__ import annotations

import argparse
import random
import time

import torch

import ipy_intervene as ii
from ipy_intervene.demo.data import IOI_TEMPLATES, NAMES, OBJECTS, PLACES


def prompts(n: int, seed: int = 0) -> tuple[list[str], torch.Tensor]:
    rng = random.Random(seed)
    texts, labels = [], []
    for _ in range(n):
        a, b = rng.sample(NAMES[:20], 2)
        second = rng.random() < 0.5
        template = rng.choice(IOI_TEMPLATES)
        texts.append(template.format(A=a, B=b, S=b if second else a, place=rng.choice(PLACES),
                                     obj=rng.choice(OBJECTS)))
        labels.append(float(second))
    return texts, torch.tensor(labels)


def naive(model: ii.Model, texts: list[str]) -> torch.Tensor:
    """One forward per prompt; a forward hook on every block keeps the last position."""
    blocks = model.module.transformer.h
    rows = []
    for text in texts:
        seen = []
        handles = [b.register_forward_hook(lambda m, a, out: seen.append(
            (out[0] if isinstance(out, tuple) else out)[0, -1].clone())) for b in blocks]
        try:
            with torch.no_grad():
                model.module(**model.tokenizer(text, return_tensors="pt").to(model.device))
        finally:
            for h in handles:
                h.remove()
        rows.append(torch.stack(seen).cpu())
    return torch.stack(rows)                                  # [prompts, layers, d]


def probe(features: torch.Tensor, labels: torch.Tensor, train: int) -> list[float]:
    """Ridge regression per layer; test accuracy of each."""
    accuracy = []
    for layer in range(features.shape[1]):
        x = torch.cat([features[:, layer].double(), torch.ones(len(labels), 1,
                                                                dtype=torch.float64)], 1)
        xt, yt = x[:train], labels[:train].double() * 2 - 1
        w = torch.linalg.solve(xt.T @ xt + 1e-2 * torch.eye(x.shape[1], dtype=x.dtype), xt.T @ yt)
        pred = (x[train:] @ w > 0).double()
        accuracy.append(float((pred == labels[train:]).double().mean()))
    return accuracy


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cpu", help="where the model runs (the cache "
                        "keeps its values on the CPU)")
    args = parser.parse_args()
    model = ii.load_model("demo")
    model.module.to(args.device)
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
    texts, labels = prompts(args.prompts)
    train = args.prompts * 3 // 4
    ii.cache(model, texts[:256], sites="resid_post")          # warm-up

    def timed(**kw) -> tuple[float, ii.ActivationCache]:
        """The median of three runs (this machine may be shared)."""
        runs = []
        for _ in range(3):
            start = time.perf_counter()
            kept = ii.cache(model, texts, sites="resid_post", batch_size=args.batch_size, **kw)
            sync()
            runs.append((time.perf_counter() - start, kept))
        return sorted(runs, key=lambda r: r[0])[1]

    ours_s, full = timed()
    features = full.stack("resid_post", pos=-1)
    last_s, last = timed(positions=-1)
    start = time.perf_counter()
    reference = naive(model, texts)
    sync()
    naive_s = time.perf_counter() - start

    gap = float((features - reference).abs().max())
    assert gap < 1e-4, f"the cache differs from the per-prompt loop by {gap}"
    assert torch.equal(last.stack("resid_post", pos=0), features)
    accuracy = probe(features, labels, train)
    n_layers = features.shape[1]
    print(f"{args.prompts} prompts ({min(full.lengths)}..{max(full.lengths)} tokens) x "
          f"{n_layers} layers, resid_post, demo model on {model.device}, "
          f"{torch.get_num_threads()} CPU threads")
    print(f"ii.cache, every position: {ours_s:.2f} s, keeps {full.nbytes / 2**20:.1f} MiB")
    print(f"ii.cache, positions=-1:   {last_s:.2f} s, keeps {last.nbytes / 2**20:.2f} MiB")
    print(f"naive per-prompt loop:    {naive_s:.2f} s")
    print(f"naive / ii.cache: {naive_s / ours_s:.1f}x (every position), "
          f"{naive_s / last_s:.1f}x (positions=-1); max difference {gap:.1e}")
    print("probe test accuracy per layer: " + ", ".join(f"L{l} {a:.2f}"
                                                          for l, a in enumerate(accuracy)))


if __name__ == "__main__":
    main()
