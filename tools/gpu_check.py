"""CUDA paths of this turn's features, checked on a machine with a GPU (never in CI).

    python tools/gpu_check.py            # prints one PASS/FAIL line per check, then timings
    python tools/gpu_check.py cpu        # the same script on the CPU (to try it here)

Each check runs the same work on the GPU as ipy_intervene does it and as plain PyTorch
hooks do it, one prompt at a time (prompts of different lengths), and compares them; half
precision is compared with float32 by top-1 token. A failing check prints why and the
others still run.
"""

from __future__ import annotations

import sys
import time
import traceback
from typing import Callable

import torch

import ipy_intervene as ii

PROMPTS = ["When Mary and John went to the store , John gave a drink to", "Then , Mary and John had",
           "When Mary and John went to the store", "Then , John had a drink"]
CLEAN = "After Mary and John went to the park , Mary gave a drink to"
RESULTS: list[tuple[str, bool, str]] = []
DEVICE = sys.argv[1] if len(sys.argv) > 1 else "cuda"


def check(name: str) -> Callable[[Callable[[], str]], Callable[[], str]]:
    def run(fn: Callable[[], str]) -> Callable[[], str]:
        try:
            detail = fn() or ""
            RESULTS.append((name, True, detail))
        except Exception as exc:  # noqa: BLE001 - report and go on
            RESULTS.append((name, False, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
        return fn
    return run


def ids(model, text):
    return model.tokenizer(text, return_tensors="pt").input_ids.to(model.device)


def alone(model, text, layer=None, hook=None):
    handle = None if hook is None else model.module.transformer.h[layer].register_forward_hook(hook)
    try:
        with torch.no_grad():
            return model.module(ids(model, text)).logits
    finally:
        if handle is not None:
            handle.remove()


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def loop_cell_matches(model, tol: float) -> str:
    vec = torch.randn(model.config.n_embd, generator=torch.Generator().manual_seed(0)).to(model.device)
    ns = {"model": model, "prompts": PROMPTS, "clean": CLEAN, "vec": vec}
    ii.trace(model, "with tracer.invoke(clean):\n"
                    "    clean_h = [model.transformer.h[l].output for l in range(4)]\n"
                    "out = []\n"
                    "for i, p in enumerate(prompts):\n"
                    "    with tracer.invoke(p):\n"
                    "        model.transformer.h[1].output[:, -1] += (i + 1) * vec.to(model.transformer.h[1].output.dtype)\n"
                    "        model.transformer.h[2].output[:, -1] = clean_h[2][:, -1]\n"
                    "        out.append(model.lm_head.output[0, -1])\n", namespace=ns)
    seen = {}
    alone(model, CLEAN, 2, lambda m, a, o: seen.setdefault("h", o))
    worst = 0.0
    for i, text in enumerate(PROMPTS):
        def steer(m, a, o, i=i):
            o = o.clone()
            o[:, -1] += (i + 1) * vec.to(o.dtype)
            return o

        def patch(m, a, o):
            o = o.clone()
            o[:, -1] = seen["h"][:, -1]
            return o

        h2 = model.module.transformer.h[2].register_forward_hook(patch)
        try:
            want = alone(model, text, 1, steer)[0, -1]
        finally:
            h2.remove()
        worst = max(worst, max_rel(ns["out"][i], want))
        assert int(ns["out"][i].argmax()) == int(want.argmax()), f"prompt {i}: top-1 differs"
    assert worst <= tol, f"max relative difference {worst:.2e} > {tol:.0e}"
    return f"max relative difference {worst:.2e}"


def main() -> None:
    assert DEVICE == "cpu" or torch.cuda.is_available(), "no CUDA device"
    cpu = ii.load_model("demo")
    gpu = ii.load_model("demo", device_map=DEVICE)
    half = ii.load_model("demo", device_map=DEVICE, dtype=torch.float16)

    check("invokes: loop of invokes + cross-invoke patching, CUDA float32 == per-prompt hooks")(
        lambda: loop_cell_matches(gpu, 1e-4))
    check("invokes: the same in float16 == per-prompt float16 hooks (top-1, 1e-2)")(
        lambda: loop_cell_matches(half, 1e-2))

    @check("invokes: read then in-place edit keeps the read on CUDA (copy on write)")
    def _cow() -> str:
        ns = {"model": gpu}
        ii.trace(gpu, "h1 = model.transformer.h[1].output\nmodel.transformer.h[2].input[:, -1] = 0\n"
                      "logits = model.lm_head.output", PROMPTS[0], namespace=ns)
        assert bool((ns["h1"][0, -1] != 0).all()), "the read was changed by the later edit"
        return ""

    @check("invokes: CUDA results equal CPU float32 (1e-4)")
    def _cpu() -> str:
        got = {}
        for name, model in (("cpu", cpu), ("gpu", gpu)):
            ns = {"model": model, "prompts": PROMPTS}
            ii.trace(model, "out = []\nfor p in prompts:\n    with tracer.invoke(p):\n"
                            "        out.append(model.lm_head.output[0, -1])\n", namespace=ns)
            got[name] = torch.stack([o.cpu() for o in ns["out"]])
        worst = max_rel(got["gpu"], got["cpu"])
        assert worst <= 1e-4, f"max relative difference {worst:.2e}"
        return f"max relative difference {worst:.2e}"

    @check("timing: 64 invokes in one cell vs 64 one-prompt traces (CUDA)")
    def _timing() -> str:
        prompts = (PROMPTS * 16)[:64]
        ns = {"model": gpu, "prompts": prompts}
        loop = "out = []\nfor p in prompts:\n    with tracer.invoke(p):\n        out.append(model.lm_head.output[0, -1])\n"
        one = "x = model.lm_head.output[0, -1]"
        for _ in range(2):
            sync(); t0 = time.perf_counter()
            ii.trace(gpu, loop, namespace=ns)
            sync(); t1 = time.perf_counter()
            for p in prompts:
                ii.trace(gpu, one, p, namespace={"model": gpu})
            sync(); t2 = time.perf_counter()
        return f"one cell {1000 * (t1 - t0):.1f} ms, 64 traces {1000 * (t2 - t1):.1f} ms, ratio {(t2 - t1) / (t1 - t0):.1f}x"

    for extra in EXTRA:
        extra(cpu, gpu, half)
    for name, ok, detail in RESULTS:
        print(f"{'PASS' if ok else 'FAIL'}  {name}" + (f": {detail}" if detail else ""))
    print(f"{sum(ok for _, ok, _ in RESULTS)} passed, {sum(not ok for _, ok, _ in RESULTS)} failed")


def features(cpu, gpu, half) -> None:
    """SAE splice on CUDA: unchanged forward bit for bit, edits and a latent sweep as on the CPU."""
    metric = ii.logit_diff("Mary", "John")
    edit = ("model.transformer.h[2].sae.latents.output[:, -1, 43] = 0\n"
            "logits = model.lm_head.output[0, -1]\n")
    for model in (cpu, gpu, half):
        ii.attach(model, model.transformer.h[2], ii.load_sae("demo"))
    try:
        @check("features: spliced SAE leaves the CUDA forward unchanged bit for bit (fp32, fp16)")
        def _same() -> str:
            for model in (gpu, half):
                ns = {"model": model}
                ii.trace(model, "logits = model.lm_head.output", PROMPTS[0], namespace=ns)
                plain = model.module.transformer.h[2].sae  # present; compare with it detached
                ii.detach(model)
                bare = {"model": model}
                ii.trace(model, "logits = model.lm_head.output", PROMPTS[0], namespace=bare)
                ii.attach(model, model.transformer.h[2], plain.dictionary)
                assert torch.equal(ns["logits"], bare["logits"]), "the splice changed the forward"
            return ""

        @check("features: a latent edit on CUDA equals the CPU (1e-4), fp16 top-1")
        def _edit() -> str:
            got = {}
            for name, model in (("cpu", cpu), ("gpu", gpu), ("half", half)):
                ns = {"model": model}
                ii.trace(model, edit, PROMPTS[0], namespace=ns)
                got[name] = ns["logits"].float().cpu()
            assert max_rel(got["gpu"], got["cpu"]) <= 1e-4
            assert int(got["half"].argmax()) == int(got["cpu"].argmax())
            return f"fp32 {max_rel(got['gpu'], got['cpu']):.1e}, fp16 {max_rel(got['half'], got['cpu']):.1e}"

        @check("features: latent sweep (256 latents, last position) CUDA == CPU (1e-4)")
        def _sweep() -> str:
            kw = dict(site="sae", latents=list(range(256)), positions=[-1])
            a = ii.patch_sweep(cpu, PROMPTS[0], CLEAN, metric, **kw).raw
            sync(); t0 = time.perf_counter()
            b = ii.patch_sweep(gpu, PROMPTS[0], CLEAN, metric, **kw).raw
            sync(); t1 = time.perf_counter()
            assert max_rel(b.cpu(), a) <= 1e-4, f"{max_rel(b.cpu(), a):.2e}"
            return f"{max_rel(b.cpu(), a):.1e}, CUDA sweep {1000 * (t1 - t0):.1f} ms"
    finally:
        for model in (cpu, gpu, half):
            ii.detach(model)


def session(cpu, gpu, half) -> None:
    """The activation cache and seeded sampling on CUDA."""
    @check("cache: ii.cache on CUDA equals the CPU per prompt, unpadded (1e-4)")
    def _cache() -> str:
        a = ii.cache(cpu, PROMPTS, sites=["resid_post", "pattern"])
        b = ii.cache(gpu, PROMPTS, sites=["resid_post", "pattern"])
        worst = 0.0
        for key in (("resid_post", 1), ("pattern", 1)):
            for x, y in zip(a[key], b[key]):
                assert x.shape == y.shape
                worst = max(worst, max_rel(y.float().cpu(), x))
        assert worst <= 1e-4, f"{worst:.2e}"
        return f"{worst:.1e}"

    @check("sampling: --generate with do_sample and a seed equals model.generate with that seed (CUDA)")
    def _sample() -> str:
        result = ii.trace(gpu, "x = 1", PROMPTS[1], namespace={"model": gpu}, generate=8,
                          do_sample=True, temperature=0.7, seed=3)
        ids_ = ids(gpu, PROMPTS[1])
        torch.manual_seed(3)
        torch.cuda.manual_seed_all(3)
        want = gpu.module.generate(ids_, attention_mask=torch.ones_like(ids_), max_new_tokens=8,
                                   do_sample=True, temperature=0.7,
                                   pad_token_id=gpu.tokenizer.pad_token_id)
        got = result.output
        assert torch.equal(got.cpu()[:, :want.shape[1]], want.cpu()), f"{got.tolist()} != {want.tolist()}"
        return ""


EXTRA: list[Callable] = [features, session]


if __name__ == "__main__":
    main()
