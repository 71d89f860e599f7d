"""Sweeps in bfloat16 and float16 against float32, on the demo model.

    python benchmarks/precision.py

Prints, for activation patching (resid_pre, head_out) and attribution patching (resid_pre),
the largest difference of the normalised values from the float32 sweep, and the clean
logit difference in each dtype (the numbers in the README).
"""

from __future__ import annotations

import torch

import ipy_intervene as ii

CLEAN = "When Mary and John went to the store , John gave a drink to"
CORRUPT = "When Mary and John went to the store , Mary gave a drink to"
CASES = (("activation", "resid_pre"), ("activation", "head_out"), ("attribution", "resid_pre"))


def sweeps(dtype: torch.dtype) -> dict[tuple[str, str], ii.SweepResult]:
    model = ii.load_model("demo", dtype=dtype)
    metric = ii.logit_diff("Mary", "John")
    return {(m, s): ii.patch_sweep(model, CLEAN, CORRUPT, metric, method=m, site=s)
            for m, s in CASES}


def main() -> None:
    reference = sweeps(torch.float32)
    for dtype in (torch.bfloat16, torch.float16):
        for case, result in sweeps(dtype).items():
            base = reference[case]
            gap = float((result.values - base.values).abs().max())
            print(f"{str(dtype).removeprefix('torch.'):8s} {case[0]:11s} {case[1]:9s} "
                  f"max |values - float32| = {gap:.3f}   clean {result.clean:.2f} "
                  f"(float32 {base.clean:.2f})")


if __name__ == "__main__":
    main()
