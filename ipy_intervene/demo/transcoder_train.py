"""Train the demo transcoders: ``python -m ipy_intervene.demo.transcoder_train``.

One ReLU transcoder per MLP of the demo model (512 latents each): it reads the MLP's input
(``ln_2``'s output) and predicts the MLP's output, trained on the demo's own training data
(:mod:`ipy_intervene.demo.data`) with a fixed seed, on the CPU in a few minutes. It writes an
SAELens folder per layer (``layer_0`` ... ``layer_3``, architecture ``transcoder``) into
``demo/transcoders/``, which ``ii.load_transcoders("demo")`` reads, then prints each one's
quality (fraction of the MLP output's variance unexplained, L0, dead latents).
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ipy_intervene.demo import data
from ipy_intervene.demo.sae_train import load_demo
from ipy_intervene.features.sae import SAE
from ipy_intervene.features.saelens import save_sae
from ipy_intervene.features.transcoders import DEMO_TRANSCODERS
from ipy_intervene.infra.hooks import HookSession


@torch.no_grad()
def mlp_pairs(model, tokenizer, n_docs: int, seed: int, batch: int = 256
              ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, the MLP's inputs and outputs ``([tokens, d], [tokens, d])`` at every real
    token of ``n_docs`` training documents."""
    rng = random.Random(seed)
    pairs, _ = data.name_pairs(0)
    facts, words = data.make_facts(0), data.vocabulary(0)
    n_layers = len(model.transformer.h)
    ins: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]
    outs: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]
    for start in range(0, n_docs, batch):
        texts = [data.training_text(rng, pairs, facts, words)
                 for _ in range(min(batch, n_docs - start))]
        enc = tokenizer(texts, padding=True, padding_side="right", return_tensors="pt")
        mask = enc.attention_mask.bool()
        seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        with HookSession() as hooks:
            for layer, block in enumerate(model.transformer.h):
                hooks.post(block.mlp, lambda m, a, o, layer=layer:
                           seen.__setitem__(layer, (a[0], o)))
            model(**enc)
        for layer, (x, y) in seen.items():
            ins[layer].append(x[mask])
            outs[layer].append(y[mask])
    return [(torch.cat(i), torch.cat(o)) for i, o in zip(ins, outs)]


def train(x: torch.Tensor, y: torch.Tensor, d_sae: int = 512, steps: int = 3000,
          batch: int = 512, l1: float = 2e-3, lr: float = 1e-3, seed: int = 0,
          desc: str = "transcoder") -> SAE:
    """Fit a transcoder from ``x`` to ``y``: MSE (in units of y's variance) + ``l1`` * sum of
    latents weighted by decoder norms; decoder rows end at unit norm."""
    gen = torch.Generator().manual_seed(seed)
    d_in, d_out = x.shape[1], y.shape[1]
    scale = float(y.sub(y.mean(0)).pow(2).sum(1).mean())
    tc = SAE(d_in, d_sae, d_out=d_out, apply_b_dec_to_input=False)
    with torch.no_grad():
        tc.W_enc.copy_(torch.randn(d_in, d_sae, generator=gen) / d_in ** 0.5)
        w = torch.randn(d_sae, d_out, generator=gen)
        tc.W_dec.copy_(w / w.norm(dim=1, keepdim=True) * 0.1)
        tc.b_dec.copy_(y.mean(0))
    opt = torch.optim.Adam(tc.parameters(), lr=lr)
    bar = tqdm(range(steps), desc=desc)
    for step in bar:
        rows = torch.randint(len(x), (batch,), generator=gen)
        f = tc.encode(x[rows])
        mse = (tc.decode(f) - y[rows]).pow(2).sum(1).mean() / scale
        loss = mse + l1 * (f * tc.W_dec.norm(dim=1)).sum(1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, 5 * (steps - step) / steps)
        if step % 200 == 0:
            bar.set_postfix(fvu=f"{mse.item():.3f}", l0=f"{(f > 0).float().sum(1).mean():.1f}")
    with torch.no_grad():
        norms = tc.W_dec.norm(dim=1).clamp(min=1e-8)
        tc.W_dec.div_(norms[:, None])
        tc.W_enc.mul_(norms)
        tc.b_enc.mul_(norms)
    return tc


@torch.no_grad()
def quality(tc: SAE, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """FVU of the MLP output, mean L0 and dead latents on held-out pairs."""
    f = tc.encode(x)
    fvu = float((tc.decode(f) - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum())
    return {"fvu": round(fvu, 4), "l0": round(float((f > 0).float().sum(1).mean()), 1),
            "dead": int((f.max(0).values <= 0).sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--docs", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEMO_TRANSCODERS)
    args = parser.parse_args()
    start = time.perf_counter()
    torch.set_num_threads(1)  # the same float order on every machine: the same weights
    torch.manual_seed(args.seed)
    model, tokenizer = load_demo()
    pairs = mlp_pairs(model, tokenizer, args.docs, args.seed)
    held_out = mlp_pairs(model, tokenizer, 300, args.seed + 1000)
    for layer, (x, y) in enumerate(pairs):
        tc = train(x, y, steps=args.steps, seed=args.seed + layer, desc=f"layer {layer}")
        save_sae(tc, args.out / f"layer_{layer}", model_name="demo",
                 hook_name=f"transformer.h[{layer}].mlp", trained_on=f"{len(x)} tokens",
                 script="python -m ipy_intervene.demo.transcoder_train")
        print(f"layer {layer}: {quality(tc, *held_out[layer])}")
    print(f"trained in {time.perf_counter() - start:.0f} s -> {args.out}")


if __name__ == "__main__":
    main()
