"""Edge attribution's cost against one plain forward, in one run, on a GPT-2-small shape
(random weights, 8 prompts x 15 tokens; benchmarks/shapes.py): EAP (one clean forward, one
corrupted forward and one backward, plus the edge scores) and EAP-IG with 5 steps.

    python benchmarks/eap.py [--device cuda] [--layers 12 --width 768 --prompts 8 --tokens 15]
                             [--steps 5] [--repeats 3]
"""

from __future__ import annotations

import statistics
import time

import torch

from ipy_intervene.circuit import edge_attribution

from shapes import arguments, gpt2_ioi


def timed(fn, repeats: int, device: torch.device) -> tuple[float, float]:
    """Median wall time and median CPU time (this process, all threads) of ``repeats``
    calls. On a shared CPU the CPU time is the steadier of the two."""
    walls, cpus = [], []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus)


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    setup = gpt2_ioi(args)
    model, device = setup.model, setup.device
    mask = torch.ones_like(setup.clean)

    def forward() -> None:
        with torch.no_grad():
            model.module(input_ids=setup.clean, attention_mask=mask)

    def eap(method: str) -> None:
        edge_attribution(model, setup.clean, setup.corrupt, setup.metric, method=method,
                         steps=args.steps)

    forward()                                    # warm-up: allocator, kernels, hooks
    result = edge_attribution(model, setup.clean, setup.corrupt, setup.metric)
    plain = timed(forward, 3 * args.repeats, device)
    t_eap = timed(lambda: eap("eap"), args.repeats, device)
    t_ig = timed(lambda: eap("eap-ig"), max(1, args.repeats // 2), device)
    after = timed(forward, 3 * args.repeats, device)       # the load may have changed
    plain = (min(plain[0], after[0]), min(plain[1], after[1]))
    shape = "GPT-2 small" if (args.layers, args.width) == (12, 768) else "NOT GPT-2 small"
    print(f"shape: {args.layers} layers x {args.width} wide ({shape}), {args.width // 64} "
          f"heads, batch {args.prompts} x {args.tokens} tokens, random weights, "
          f"{device}, {torch.get_num_threads()} threads; {result.graph.n_edges} edges")
    print(f"{'':24} {'wall ms':>9} {'x fwd':>6}   {'cpu ms':>9} {'x fwd':>6}")
    rows = [("plain forward", plain, ""), ("EAP", t_eap, "2 forwards + 1 backward + scores"),
            (f"EAP-IG (steps={args.steps})", t_ig,
             f"1 + {args.steps} forwards, {args.steps} backwards")]
    for name, (wall, cpu), what in rows:
        print(f"{name:24} {wall * 1000:9.1f} {wall / plain[0]:6.2f}   {cpu * 1000:9.1f} "
              f"{cpu / plain[1]:6.2f}   {what}")
    print("plain forward: the faster of the medians before and after; on a shared machine "
          "the CPU-time ratios are the steadier ones")


if __name__ == "__main__":
    main()
