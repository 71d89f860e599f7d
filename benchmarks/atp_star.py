"""AtP* against plain attribution and exact patching, in one run:

- the fraction of the exact top-10 head cells that attribution and AtP* each catch, on the
  demo model (IOI prompts and metric, as examples/ioi_circuit.ipynb) and on a random-weights
  GPT-2 shape (benchmarks/shapes.py);
- screen-then-verify (AtP* screen + exact top-10) time vs the exact full grid;
- AtP*'s time and passes vs plain attribution's.

    python benchmarks/atp_star.py [--device cuda] [--layers 12 --width 768 --prompts 8 --tokens 15]
"""

from __future__ import annotations

import time

import torch

import ipy_intervene as ii
from ipy_intervene.sweep import atp_star
from ipy_intervene.sweep.screen import screen_and_verify

from shapes import arguments, gpt2_ioi

TOP = 10
SITES = ("head_out", "head_q", "head_k")


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def top_set(result, k=TOP):
    flat = (result.values.flatten() - result.unpatched).nan_to_num(0.0).abs()
    return set(flat.argsort(descending=True)[:k].tolist())


def compare(name, model, clean, corrupt, metric, site):
    exact, t_exact = timed(lambda: ii.patch_sweep(model, clean, corrupt, metric, site=site))
    truth = top_set(exact)
    k = len(truth)
    rows = {}
    plain, t_plain = timed(lambda: atp_star.sweep(model, clean, corrupt, metric, site=site,
                                                   grad_drop=False, qk_fix=False))
    star, t_star = timed(lambda: atp_star.sweep(model, clean, corrupt, metric, site=site))
    fix_only, _ = timed(lambda: atp_star.sweep(model, clean, corrupt, metric, site=site,
                                                grad_drop=False))
    rows["attribution"] = len(top_set(plain) & truth) / k
    rows["QK fix only"] = len(top_set(fix_only) & truth) / k
    rows["AtP*"] = len(top_set(star) & truth) / k
    screen, t_screen = timed(lambda: screen_and_verify(model, clean, corrupt, metric, site=site,
                                                        top=TOP))
    print(f"{name:>12} {site:>8} ({exact.values.numel()} cells): exact top-{k} caught by "
          + ", ".join(f"{m} {v:.0%}" for m, v in rows.items()))
    print(f"{'':>12} {'':>8} AtP* {t_star:.2f} s = {t_star / t_plain:.1f}x attribution "
          f"({t_plain:.2f} s); passes {star.extra['cost']} vs {plain.extra['cost']}")
    print(f"{'':>12} {'':>8} screen-then-verify {t_screen:.2f} s = "
          f"{t_screen / t_exact:.2f}x the exact full grid ({t_exact:.2f} s)")


def main() -> None:
    args = arguments(__doc__.splitlines()[0]).parse_args()
    torch.set_grad_enabled(False)
    demo = ii.load_model("demo")
    clean = "When Mary and John went to the store , John gave a drink to"
    corrupt = "When Mary and John went to the store , Mary gave a drink to"
    for site in SITES:
        compare("demo", demo, clean, corrupt, ii.logit_diff("Mary", "John"), site)
    setup = gpt2_ioi(args)
    for site in SITES:
        compare(f"gpt2 {args.layers}x{args.width}", setup.model, setup.clean, setup.corrupt,
                setup.metric, site)


if __name__ == "__main__":
    main()
