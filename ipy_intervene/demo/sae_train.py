"""Train the demo SAE: ``python -m ipy_intervene.demo.sae_train``.

A ReLU sparse autoencoder (512 latents) on the demo model's residual stream after block 2
(``transformer.h[2]``'s output), trained on activations of the demo's own training data
(:mod:`ipy_intervene.demo.data`) with a fixed seed, on the CPU in about a minute. It writes
an SAELens folder (``cfg.json`` + ``sae_weights.safetensors``) into ``demo/sae/``, which
``ii.load_sae("demo")`` reads, then prints its quality (:func:`quality`).
"""

from __future__ import annotations

import argparse
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ipy_intervene.demo import data
from ipy_intervene.demo.evaluate import held_out_ioi, last_logits, token_id
from ipy_intervene.features.sae import SAE
from ipy_intervene.features.saelens import DEMO_SAE, save_sae
from ipy_intervene.features.splice import attach, detach
from ipy_intervene.infra.hooks import site_hooks

SITE = "transformer.h[2]"
LAYER = 2


@dataclass(frozen=True)
class SAEQuality:
    fvu: float                    # fraction of variance unexplained, held-out activations
    l0: float                     # mean number of active latents per token
    dead: int                     # latents that never fire on the held-out activations
    ioi_logit_diff: float         # mean IO - S logit, held-out IOI, no SAE
    ioi_logit_diff_kept: float    # ... with the SAE spliced and its error term kept
    ioi_logit_diff_dropped: float  # ... with the error term dropped (reconstruction only)


def load_demo():
    """The embedded demo model (raw transformers module) and its tokenizer."""
    import ipy_intervene as ii

    model = ii.load_model("demo")
    return model.module, model.tokenizer


@torch.no_grad()
def activations(model, tokenizer, n_docs: int, seed: int, batch: int = 256) -> torch.Tensor:
    """Residual vectors after block ``LAYER`` at every real token of ``n_docs`` training
    documents, ``[tokens, d_model]``."""
    rng = random.Random(seed)
    pairs, _ = data.name_pairs(0)
    facts, words = data.make_facts(0), data.vocabulary(0)
    out = []
    for start in range(0, n_docs, batch):
        texts = [data.training_text(rng, pairs, facts, words)
                 for _ in range(min(batch, n_docs - start))]
        enc = tokenizer(texts, padding=True, padding_side="right", return_tensors="pt")
        seen: list[torch.Tensor] = []
        # our own hook, removed after: output_hidden_states would leave transformers' hooks
        with site_hooks([(model.transformer.h[LAYER], "block_out", seen.append)]):
            model(**enc)
        out.append(seen[0][enc.attention_mask.bool()])
    return torch.cat(out)


def train(acts: torch.Tensor, d_sae: int = 512, steps: int = 3000, batch: int = 512,
          l1: float = 3e-3, lr: float = 1e-3, seed: int = 0) -> SAE:
    """Fit an SAE to ``acts``: MSE + ``l1`` * sum of latents weighted by decoder norms."""
    gen = torch.Generator().manual_seed(seed)
    d_in = acts.shape[1]
    scale = float(acts.sub(acts.mean(0)).norm(dim=1).pow(2).mean())  # for the loss' units
    sae = SAE(d_in, d_sae)
    with torch.no_grad():
        w = torch.randn(d_sae, d_in, generator=gen)
        sae.W_dec.copy_(w / w.norm(dim=1, keepdim=True))
        sae.W_enc.copy_(sae.W_dec.T)
        sae.b_dec.copy_(acts.median(0).values)
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    bar = tqdm(range(steps), desc="training demo SAE")
    for step in bar:
        x = acts[torch.randint(len(acts), (batch,), generator=gen)]
        f = sae.encode(x)
        mse = (sae.decode(f) - x).pow(2).sum(1).mean() / scale
        sparsity = (f * sae.W_dec.norm(dim=1)).sum(1).mean()
        loss = mse + l1 * sparsity
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, 5 * (steps - step) / steps)  # decay over the last 20%
        if step % 200 == 0:
            bar.set_postfix(fvu=f"{mse.item():.3f}", l0=f"{(f > 0).float().sum(1).mean():.1f}")
    with torch.no_grad():  # unit decoder rows, the scale moved into the encoder
        norms = sae.W_dec.norm(dim=1)
        sae.W_dec.div_(norms[:, None])
        sae.W_enc.mul_(norms)
        sae.b_enc.mul_(norms)
    return sae


@torch.no_grad()
def quality(sae: SAE, model=None, tokenizer=None, seed: int = 1) -> SAEQuality:
    """FVU, L0 and dead latents on fresh activations; IOI logit difference (held-out name
    pairs) without the SAE, with it spliced at ``SITE`` and the error kept, and dropped."""
    if model is None:
        model, tokenizer = load_demo()
    acts = activations(model, tokenizer, 500, seed=seed + 1000)
    f = sae.encode(acts)
    fvu = float((sae.decode(f) - acts).pow(2).sum() / (acts - acts.mean(0)).pow(2).sum())
    l0 = float((f > 0).float().sum(1).mean())
    dead = int((f.max(0).values <= 0).sum())
    return SAEQuality(fvu, l0, dead, ioi_diff(model, tokenizer), ioi_diff(model, tokenizer, sae),
                      ioi_diff(model, tokenizer, sae, drop_error=True))


@torch.no_grad()
def ioi_diff(model, tokenizer, sae: SAE | None = None, drop_error: bool = False) -> float:
    """Mean IO - S logit over the held-out IOI prompts (optionally with ``sae`` spliced)."""
    cases = held_out_ioi(0)
    splice = attach(model, SITE, sae) if sae is not None else None
    handle = None
    if splice is not None and drop_error:
        handle = splice.error.register_forward_hook(lambda m, a, out: torch.zeros_like(out))
    try:
        logits = last_logits(model, tokenizer, [c[0] for c in cases])
    finally:
        if handle is not None:
            handle.remove()
        if splice is not None:
            detach(model)
    io = torch.tensor([token_id(tokenizer, c[1]) for c in cases])
    s = torch.tensor([token_id(tokenizer, c[2]) for c in cases])
    rows = torch.arange(len(cases))
    return float((logits[rows, io] - logits[rows, s]).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--docs", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEMO_SAE)
    args = parser.parse_args()
    start = time.perf_counter()
    torch.set_num_threads(1)  # the same float order on every machine: the same weights
    torch.manual_seed(args.seed)
    model, tokenizer = load_demo()
    acts = activations(model, tokenizer, args.docs, args.seed)
    sae = train(acts, steps=args.steps, seed=args.seed)
    save_sae(sae, args.out, model_name="demo", hook_name=SITE, trained_on=f"{len(acts)} tokens",
             script="python -m ipy_intervene.demo.sae_train")
    print(f"trained on {len(acts)} activations in {time.perf_counter() - start:.0f} s -> "
          f"{args.out}")
    print(quality(sae, model, tokenizer))


if __name__ == "__main__":
    main()
