"""The families x methods matrix: every decoder family (a small random model of each) x every
analysis, in eager and SDPA attention. Each cell runs the package on a left-padded batch of 3
prompts of different lengths and the plain-hooks oracle of tests/family_oracles.py one prompt
at a time: ``exact`` when they agree (fp32, 1e-5) -- the only way a cell is exact --,
``refused`` when the package raises a clear ``ii`` error naming the family, ``skipped`` when
this transformers has no such family (or the family no SDPA). Anything else (a different
answer, a raw exception, an error that does not name the family) is a failing cell.

Deterministic: :func:`outcome` is computed once per (family, attention, method) and
memoised; it does not depend on which cell ran before (each cell sets its attention, builds
what it attaches and removes it), so the README table (:func:`table`) is the same whatever
tests ran first or were selected with ``-k``: its test asks for every cell.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import torch
from torch import nn

import ipy_intervene as ii
from ipy_intervene.errors import InterventionError, SiteError

import family_oracles as o
from family_eap import eap_scores

SHAPE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=64, max_position_embeddings=64, head_dim=8, bos_token_id=0,
             eos_token_id=0, pad_token_id=1, initializer_range=0.2)
MOE = dict(num_local_experts=4, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
           shared_expert_intermediate_size=32, n_routed_experts=4, n_shared_experts=1)
WINDOW = dict(sliding_window=4)
TWO_KINDS = dict(layer_types=["sliding_attention", "full_attention"], **WINDOW)
# row -> (model_type, config extras): every decoder family of issue 29
FAMILIES: dict[str, tuple[str, dict]] = {
    "gpt2": ("gpt2", {}),
    "gpt_neo": ("gpt_neo", dict(attention_types=[[["global", "local"], 1]], num_layers=2,
                                num_heads=4, window_size=4)),
    "gptj": ("gptj", dict(rotary_dim=4)),
    "gpt_neox": ("gpt_neox", dict(use_parallel_residual=True)),
    "gpt_neox (serial)": ("gpt_neox", dict(use_parallel_residual=False)),
    "llama": ("llama", {}),
    "mistral": ("mistral", WINDOW),
    "mixtral": ("mixtral", MOE),
    "qwen2": ("qwen2", {}),
    "qwen2_moe": ("qwen2_moe", MOE),
    "qwen3": ("qwen3", {}),
    "qwen3_moe": ("qwen3_moe", MOE),
    "gemma": ("gemma", {}),
    "gemma2": ("gemma2", TWO_KINDS),
    "gemma3_text": ("gemma3_text", TWO_KINDS),
    "gemma4_text": ("gemma4_text", dict(TWO_KINDS, global_head_dim=8,
                                        hidden_size_per_layer_input=8,
                                        num_kv_shared_layers=0)),
    "phi": ("phi", {}),
    "phi3": ("phi3", {}),
    "olmo": ("olmo", {}),
    "olmo2": ("olmo2", {}),
    "olmo3": ("olmo3", TWO_KINDS),
    "olmoe": ("olmoe", MOE),
    "falcon": ("falcon", dict(head_dim=None)),       # a property there
    "cohere": ("cohere", {}),
    "cohere2": ("cohere2", TWO_KINDS),
    "stablelm": ("stablelm", {}),
    "granite": ("granite", {}),
    "smollm3": ("smollm3", {}),
    "gpt_oss": ("gpt_oss", dict(MOE, **TWO_KINDS)),
    "deepseek_v3": ("deepseek_v3", dict(MOE, head_dim=4, num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=16,
                                        qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8,
                                        first_k_dense_replace=1, n_group=1, topk_group=1)),
}
IMPLS = ("eager", "sdpa")
HEAD_SITES = ("head_q", "head_k", "head_v", "head_pattern")


@dataclass(frozen=True)
class Outcome:
    """``status``: exact, refused, skipped, or a failing one (wrong, crash, unclear)."""

    status: str
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.status in ("exact", "refused", "skipped")


class Skip(Exception):
    """This transformers (or this family) lacks what the cell needs."""


@functools.lru_cache(maxsize=None)
def tokenizer():
    return ii.load_model("demo").tokenizer


@functools.lru_cache(maxsize=None)
def model_of(family: str) -> ii.Model | str:
    """The family's seeded 2-layer, 32-wide random model, built once; a string: why not."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, extra = FAMILIES[family]
    vocab = len(tokenizer())
    try:
        cfg = AutoConfig.for_model(model_type, vocab_size=vocab, **{
            k: v for k, v in {**SHAPE, **extra}.items() if v is not None})
    except (KeyError, ValueError) as error:
        return f"this transformers has no {model_type!r} ({type(error).__name__})"
    torch.manual_seed(0)
    module = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for layer, block in enumerate(getattr(getattr(module, "model", None), "layers", ())):
            if hasattr(block, "layer_scalar"):    # Gemma 4: ones at init, not in checkpoints
                block.layer_scalar.fill_(0.75 + 0.5 * layer)
    return ii.wrap(module, tokenizer())


def blocks_of(module: nn.Module) -> str:
    """The path of the decoder blocks found without the architecture table: the ModuleList
    as long as the config's layer count."""
    n = module.config.num_hidden_layers
    return next(name for name, m in module.named_modules()
                if isinstance(m, nn.ModuleList) and len(m) == n)


# -- the cells: the package on the padded batch, the oracle one prompt at a time ---------------


def cell_trace(model: ii.Model) -> None:
    """Read a block's output, then zero it at the last position (``.output[0]`` when the
    block returns a tuple: the package must say so)."""
    module = model.module
    path = blocks_of(module)
    block = "model." + re.sub(r"\.(\d+)$", r"[\1]", path + ".0")
    h = o.first(ii.trace(model, f"h = {block}.output", o.ids(o.CLEAN)).names["h"])
    target = nn.Module.get_submodule(module, path + ".0")
    try:
        out = ii.trace(model, f"{block}.output[:, -1] = 0", o.ids(o.CLEAN)).output
    except InterventionError as error:
        if ".output[0]" not in str(error):
            raise
        out = ii.trace(model, f"{block}.output[0][:, -1] = 0", o.ids(o.CLEAN)).output

    def zero(out_):
        x = o.first(out_).clone()
        x[:, -1] = 0
        return o.replace(out_, x)
    for i, prompt in enumerate(o.CLEAN):
        pad, seen = o.WIDTH - len(prompt), {}
        o.logits_alone(module, prompt, post=[(target, lambda x: seen.__setitem__(0, o.first(x)))])
        o.close(h[i, pad:], seen[0][0], f"block output, prompt {i}")
        with torch.no_grad():
            want = o.logits_alone(module, prompt, post=[(target, zero)])
        o.close(out[i, pad:], want[0], f"logits after the write, prompt {i}")


def _sweep(model, site, **kw):
    return ii.patch_sweep(model, o.ids(o.CLEAN), o.ids(o.CORRUPT), ii.logit_diff(o.GOOD, o.BAD),
                          site=site, **kw)


def _nontrivial(want, what):
    assert float(want.max() - want.min()) > 1e-4, f"{what}: the oracle's values do not vary"


def cell_module_sweep(site):
    def cell(model):
        got = _sweep(model, site).per_prompt
        want = o.module_sweep(model.module, ii.adapter_for(model), site)
        o.close(got, want, f"{site} sweep [layer, pos, prompt]")
        _nontrivial(want, site)
    return cell


def cell_head_out(model):
    got = _sweep(model, "head_out").per_prompt
    want = o.head_out_sweep(model.module, ii.adapter_for(model))
    o.close(got, want, "head_out sweep [layer, head, prompt]")
    _nontrivial(want, "head_out")


def cell_head_site(site):
    def cell(model):
        got = _sweep(model, site).per_prompt
        want = o.head_site_sweep(model.module, ii.adapter_for(model).n_layers,
                                 site.removeprefix("head_"))
        o.close(got, want, f"{site} sweep [layer, head, prompt]")
        _nontrivial(want, site)
    return cell


def cell_patterns(model):
    batch = ii.attention_patterns(model, o.ids(o.CLEAN))
    for i, prompt in enumerate(o.CLEAN):
        _, seen = o.logits_by_hand(model.module, prompt)
        for layer in sorted(seen):
            o.close(batch[i].patterns[layer], seen[layer]["pattern"][0],
                    f"pattern of layer {layer}, prompt {i}")


def cell_cache(model):
    """The residual sites and what attention and the MLP add; where ``mlp_out`` is refused
    (its own column says why), the others."""
    sites = ["resid_pre", "attn_out", "mlp_out", "resid_post"]
    try:
        cache = ii.cache(model, o.ids(o.CLEAN), sites=sites)
    except SiteError as error:
        if "`mlp_out`" not in str(error):
            raise
        sites.remove("mlp_out")
        cache = ii.cache(model, o.ids(o.CLEAN), sites=sites)
    adapter = ii.adapter_for(model)
    for i, prompt in enumerate(o.CLEAN):
        for site in sites:
            want = o.record(model.module, adapter, site, prompt)
            for layer in range(adapter.n_layers):
                o.close(cache[site, layer][i], want[layer][0], f"{site} {layer}, prompt {i}")


def cell_lens(model):
    cache = ii.cache(model, o.ids(o.CLEAN), sites=["resid_post"])
    adapter = ii.adapter_for(model)
    for i, prompt in enumerate(o.CLEAN):
        got = ii.lens(model, cache, prompt=i).probs
        o.close(got, o.lens_probs(model.module, adapter, prompt), f"lens, prompt {i}")


def cell_decompose(model):
    cache = ii.cache(model, o.ids(o.CLEAN), sites=["embed", "resid_pre", "head_out", "attn_out",
                                                    "mlp_out", "resid_post"])
    adapter = ii.adapter_for(model)
    for i, prompt in enumerate(o.CLEAN):
        d = ii.decompose(model, cache, ii.logit_diff(o.GOOD, o.BAD), row=i)
        want = o.decompose_alone(model.module, adapter, prompt)
        if want["heads"] is None:          # a norm after attention: heads are not parts
            assert bool(d.heads.isnan().all()), "heads should be NaN under a post-norm"
        else:
            o.close(d.heads, want["heads"], f"head shares, prompt {i}")
        o.close(d.layers["attn"], want["attn"], f"attention shares, prompt {i}")
        o.close(d.layers["mlp"], want["mlp"], f"MLP shares, prompt {i}")
        o.close(torch.tensor([d.total, d.actual]), torch.tensor([want["actual"]] * 2),
                f"total and actual, prompt {i}")


def _block0(model):
    """(envoy path, module) of the first block, found without the architecture table."""
    path = blocks_of(model.module)
    return f"{path}[0]", nn.Module.get_submodule(model.module, path + ".0")


def _attached(model, fn):
    path, target = _block0(model)
    sae = o.TinySAE(model.module.config.hidden_size)
    ii.attach(model, path, sae)
    try:
        return fn(model, path, target, sae)
    finally:
        ii.detach(model)


def cell_latent_splice(model):
    def run(model, path, target, sae):
        site = f"model.{path}.sae.latents.output"
        result = ii.trace(model, f"lat = {site}.clone()\n{site}[:, -1, 3] = 2.0",
                          o.ids(o.CLEAN))
        return result.names["lat"], result.output
    lat, logits = _attached(model, run)
    _, target = _block0(model)
    sae = o.TinySAE(model.module.config.hidden_size)

    def edit(x):
        x[0, -1, 3] = 2.0
    for i, prompt in enumerate(o.CLEAN):
        pad = o.WIDTH - len(prompt)
        want, want_lat = o.spliced(model.module, target, sae, prompt, edit)
        o.close(lat[i, pad:], want_lat[0], f"latents, prompt {i}")
        o.close(logits[i, pad:], want[0], f"logits with a latent set, prompt {i}")


def cell_latent_sweep(model):
    picked = [1, 5, 11]
    got = _attached(model, lambda m, *_: _sweep(m, "sae", latents=picked)).per_prompt
    sae = o.TinySAE(model.module.config.hidden_size)
    want = o.latent_sweep(model.module, _block0(model)[1], sae, picked)
    o.close(got.reshape(want.shape), want, "latent sweep [latent, pos, prompt]")
    _nontrivial(want, "latent sweep")


def cell_eap(model):
    result = ii.edge_attribution(model, o.ids(o.CLEAN), o.ids(o.CORRUPT),
                                 ii.logit_diff(o.GOOD, o.BAD))
    want, mask = eap_scores(model.module, ii.adapter_for(model), result.graph)
    assert torch.equal(~result.scores.isnan(), mask), "EAP: the upstream edges differ"
    o.close(result.scores.nan_to_num(), want.nan_to_num(), "EAP scores [sender, receiver]")
    _nontrivial(want.nan_to_num(), "EAP")


def cell_path_patch(model):
    got = ii.path_patch(model, o.ids(o.CLEAN), o.ids(o.CORRUPT),
                        ii.logit_diff(o.GOOD, o.BAD)).per_prompt
    want = o.path_to_logits(model.module, ii.adapter_for(model))
    o.close(got, want, "path patching to the logits [layer, head, prompt]")
    _nontrivial(want, "path patching")


def cell_path_query(model):
    got = ii.path_patch(model, o.ids(o.CLEAN), o.ids(o.CORRUPT), ii.logit_diff(o.GOOD, o.BAD),
                        receivers=[(1, 0)], receiver_input="q").per_prompt
    want = o.path_to_query(model.module, ii.adapter_for(model), (1, 0))
    o.close(got, want, "path patching to L1H0's query [layer, head, prompt]")
    _nontrivial(want, "path patching to a query")


METHODS = {
    "trace": cell_trace,
    "resid_pre": cell_module_sweep("resid_pre"),
    "resid_mid": cell_module_sweep("resid_mid"),
    "attn_out": cell_module_sweep("attn_out"),
    "mlp_out": cell_module_sweep("mlp_out"),
    "head_out": cell_head_out,
    **{site: cell_head_site(site) for site in HEAD_SITES},
    "patterns": cell_patterns,
    "decompose": cell_decompose,
    "cache": cell_cache,
    "lens": cell_lens,
    "latent splice": cell_latent_splice,
    "latent sweep": cell_latent_sweep,
    "EAP": cell_eap,
    "path to logits": cell_path_patch,
    "path to q": cell_path_query,
}


# -- outcomes ---------------------------------------------------------------------------------


def _names_family(text: str, family: str) -> bool:
    model_type = FAMILIES[family][0]
    return model_type.lower() in text.lower()


@functools.lru_cache(maxsize=None)
def outcome(family: str, impl: str, method: str) -> Outcome:
    """The cell's outcome, computed once (see the module docstring)."""
    model = model_of(family)
    if isinstance(model, str):
        return Outcome("skipped", model)
    try:
        model.module.set_attn_implementation(impl)
    except (ValueError, ImportError) as error:
        return Outcome("skipped", f"no {impl} attention ({str(error)[:60]})")
    if model.module.config._attn_implementation != impl:      # GPT-Neo keeps its own
        return Outcome("skipped", f"no {impl} attention (the family keeps "
                                  f"{model.module.config._attn_implementation!r})")
    try:
        METHODS[method](model)
    except AssertionError as error:
        return Outcome("wrong", str(error)[:2000])
    except InterventionError as error:
        text = str(error)
        if not _names_family(text, family):
            return Outcome("unclear", f"{type(error).__name__}: {text[:400]}")
        return Outcome("refused", f"{type(error).__name__}: {text}")
    except Exception as error:  # noqa: BLE001 - a raw exception is a failing cell
        import traceback

        return Outcome("crash", "".join(traceback.format_exception(error))[-2500:])
    finally:
        ii.detach(model) if ii.attached(model) else None
    return Outcome("exact")


# -- the README table ------------------------------------------------------------------------

START = "<!-- family-table:start (generated by `python tools/family_table.py`; do not edit) -->"
END = "<!-- family-table:end -->"


def _short(reason: str, family: str) -> str:
    """A refusal's footnote: the message without its class, to its first clause, the
    family's name and measured numbers left out (so families refused alike share it)."""
    text = reason.split(": ", 1)[-1].replace("\n", " ")
    for stop in (": ", "; ", ". "):
        text = text.split(stop, 1)[0]
    text = re.sub(r"\s*\([^()]*\d[^()]*\)", "", text)
    text = re.sub(rf"'?\b{re.escape(FAMILIES[family][0])}\b'?", "⟨family⟩", text)
    return text if len(text) <= 200 else text[:text.rfind(" ", 0, 200)] + " …"


def _mark(outcomes: dict[str, Outcome], family: str, notes: dict[str, int]) -> str:
    def one(out: Outcome) -> str:
        if out.status == "exact":
            return "✓"
        if out.status == "skipped":
            return "–"
        if out.status == "refused":
            note = notes.setdefault(_short(out.reason, family), len(notes) + 1)
            return f"✗{note}"
        return f"**{out.status.upper()}**"
    ran = {impl: out for impl, out in outcomes.items()
           if not (out.status == "skipped" and out.reason.startswith("no "))}
    marks = {impl: one(out) for impl, out in ran.items()}
    if len(set(marks.values())) <= 1:
        return next(iter(marks.values()), "–")
    return ", ".join(f"{mark} {impl}" for impl, mark in marks.items())


def table() -> str:
    """The README section: families x methods, from :func:`outcome` of every cell."""
    notes: dict[str, int] = {}
    header = ["family", *METHODS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    counts = {"✓": 0, "✗": 0, "–": 0}
    eager_only = []
    for family in FAMILIES:
        row = []
        for method in METHODS:
            mark = _mark({impl: outcome(family, impl, method) for impl in IMPLS}, family, notes)
            row.append(mark)
            counts[next((c for c in counts if mark.startswith(c)), "✗")] += 1
        sdpa = outcome(family, "sdpa", "trace")
        label = family
        if sdpa.status == "skipped" and sdpa.reason.startswith("no "):
            label += " ᵉ"
            eager_only.append(family)
        lines.append("| " + " | ".join([label, *row]) + " |")
    legend = (f"✓ exact: equal to the plain-hooks oracle run one prompt at a time (fp32, "
              f"1e-5) in eager and SDPA attention; ✗n refused with a clear error (note n); "
              f"– this transformers has no such family; ᵉ the family has eager attention "
              f"only. {counts['✓']} exact, {counts['✗']} refused, {counts['–']} skipped of "
              f"{len(FAMILIES) * len(METHODS)} cells.")
    foot = [f"{n}. {text}" for text, n in notes.items()]
    return "\n".join([START, "", legend, "", *lines, "", *foot, "", END])
