"""Issue 27: a sweep after a change of the model equals the same sweep run with nothing kept.

``ii.patch_sweep`` keeps whole results (sweep/memo.py: an identical sweep returns the earlier
result marked ``extra["reused"]``, once a forward proves it current); recorded clean and
corrupted runs are not kept across sweeps (they were, until issue 27). Nothing kept may
outlive a change of what the model computes. For each kind of change below (parametrized, readable ids):

- ``test_the_same_sweep_after_a_change_equals_a_fresh_one``: sweep S, change the model, S
  again (reuse allowed), S with nothing kept (:func:`fresh`): the second equals the fresh one
  exactly (``values``, ``raw`` and the clean/corrupted baselines, bit for bit; NaN = NaN),
  or raises the same kind of error when the fresh one raises;
  and the first differs from the fresh one where the change changes the model (so the test
  can fail).
- ``test_another_sweep_after_a_change_equals_a_fresh_one``: the recorded runs. After the
  change a sweep with another metric, another site or ``method="attribution"`` than the
  sweeps before it (whose recordings are kept), against the same sweep with nothing kept.

A result marked ``reused`` must always equal the fresh one. The models are fresh per test
(the demo's module deep-copied, tiny seeded Llama and Mistral models with the demo's word
tokenizer), so no change leaks into other tests.
"""

from __future__ import annotations

import copy
import types
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, Callable

import pytest
import torch
from torch import nn

import ipy_intervene as ii
from ipy_intervene.sweep import memo
from conftest import CORRUPT, PROMPT, tiny_model

LOGIT_DIFF = ii.logit_diff("Mary", "John")


# -- the sweeps ---------------------------------------------------------------------------------

def sweep(model: ii.Model, metric: Any = LOGIT_DIFF, **options: Any) -> Any:
    """S: the public, remembering ``ii.patch_sweep`` on the IOI pair (15 tokens)."""
    return ii.patch_sweep(model, PROMPT, CORRUPT, metric, **options)


def attempt(fn: Callable[[], Any]) -> Any:
    """``fn()``, or the exception it raised (compared like a result)."""
    try:
        return fn()
    except Exception as error:  # noqa: BLE001 - a sweep that raises is an outcome too
        return error


def forget() -> None:
    memo.forget()


def fresh(fn: Callable[[], Any]) -> Any:
    """``fn()`` with nothing kept from before: no remembered sweep, no recorded run."""
    forget()
    return attempt(fn)


def describe(result: Any) -> str:
    if isinstance(result, BaseException):
        return f"raised {type(result).__name__}: {result}"
    largest = result.values.abs().flatten().topk(3).indices
    return f"reused={result.extra.get('reused')!r}, largest values " \
           f"{[round(v, 4) for v in result.values.flatten()[largest].tolist()]}"


def identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``torch.equal``, with NaN equal to NaN (a metric normalised by a zero difference)."""
    return a.shape == b.shape and a.dtype == b.dtype and \
        bool(((a == b) | (a.isnan() & b.isnan())).all())


def assert_same(got: Any, want: Any, what: str) -> None:
    """``got`` (reuse allowed) is the fresh ``want``: the same exception type, or exactly the
    same ``values`` and ``raw``. A result marked reused that is not the fresh one fails here."""
    if isinstance(want, BaseException):
        assert isinstance(got, type(want)), \
            f"{what}: the fresh sweep raised {type(want).__name__}: {want}; this one {describe(got)}"
        return
    assert not isinstance(got, BaseException), \
        f"{what}: {describe(got)}; the fresh sweep gave a result"
    same = identical(got.values, want.values) and identical(got.raw, want.raw) and \
        identical(torch.tensor([got.clean, got.corrupted], dtype=torch.float64),
                  torch.tensor([want.clean, want.corrupted], dtype=torch.float64))
    gap = (got.raw.double() - want.raw.double()).abs().max().item() \
        if got.raw.shape == want.raw.shape else "shapes differ"
    assert same, f"{what} differs from the same sweep with nothing kept by up to {gap} " \
                 f"({describe(got)}; fresh: {describe(want)})"
    assert not want.extra.get("reused")


def assert_differs(before: Any, after: Any, what: str) -> None:
    """The change changed the numbers (else the test above could not fail)."""
    if isinstance(after, BaseException) or isinstance(before, BaseException):
        return
    assert not identical(before.raw, after.raw), \
        f"{what}: the change did not change the sweep; pick a change that does"


@pytest.fixture(autouse=True)
def nothing_kept(monkeypatch):
    monkeypatch.setattr(memo, "MIN_SECONDS", 0.0)   # keep every sweep, however quick
    forget()
    yield
    forget()


# -- the models: fresh per test -----------------------------------------------------------------

def build(kind: str, demo: ii.Model) -> ii.Model:
    if kind == "demo":          # 4 layers, 128 wide, tied embedding/unembedding, SDPA
        return ii.wrap(copy.deepcopy(demo.module), copy.deepcopy(demo.tokenizer))
    if kind == "llama":         # 3 layers, 32 wide, random (seeded)
        return ii.wrap(tiny_model("llama", len(demo.tokenizer)), demo.tokenizer)
    if kind == "mistral":       # the same, with a sliding window (64: longer than the prompt)
        from transformers import AutoConfig, AutoModelForCausalLM

        torch.manual_seed(0)
        config = AutoConfig.for_model(
            "mistral", vocab_size=len(demo.tokenizer), hidden_size=32, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
            max_position_embeddings=64, sliding_window=64, bos_token_id=0, eos_token_id=0,
            pad_token_id=1)
        return ii.wrap(AutoModelForCausalLM.from_config(config).eval(), demo.tokenizer)
    raise ValueError(kind)


def blocks(model: ii.Model) -> nn.ModuleList:
    module = model.module
    return module.transformer.h if hasattr(module, "transformer") else module.model.layers


def patch_attribute(undo: ExitStack, owner: Any, name: str, value: Any) -> None:
    """``owner.name = value`` until the test ends (classes, module globals, registries)."""
    old = getattr(owner, name)
    setattr(owner, name, value)
    undo.callback(setattr, owner, name, old)


# -- the changes --------------------------------------------------------------------------------

@dataclass
class Change:
    """``apply(model, undo, note)`` changes the model between the two sweeps; ``prepare``
    (same arguments) runs before the first sweep; ``undo`` (an ExitStack) restores what
    outlives the model (classes, globals, the default dtype) when the test ends."""

    id: str
    model: str
    apply: Callable[[ii.Model, ExitStack, dict], None]
    prepare: Callable[[ii.Model, ExitStack, dict], None] | None = None
    changes_values: bool = True     # False: the numbers may stay the same (no "differs" check)


def swap_tied_rows(model, undo, note):
    """Two rows of the tied embedding/unembedding swapped: the sum of the bits is kept."""
    w = model.module.transformer.wte.weight
    a, b = model.token_id("Mary"), model.token_id("John")
    w.data[[a, b]] = w.data[[b, a]].clone()


def flip_copy(model, undo, note):
    p = blocks(model)[1].mlp.c_fc.weight
    p.data.copy_(p.data.flip(0))


def roll_setitem(model, undo, note):
    w = blocks(model)[0].attn.c_proj.weight
    w.data[:] = w.data.roll(5)


def numpy_swap(model, undo, note):
    """An edit through a NumPy view: no version bump, the same bits in another order."""
    array = blocks(model)[2].mlp.c_proj.weight.detach().numpy()
    array[[0, 1]] = array[[1, 0]]


def ln_f_eps(model, undo, note):
    model.module.transformer.ln_f.eps = 1.0


def gpt2_attn_scaling(model, undo, note):
    blocks(model)[0].attn.scaling = 1.0


def class_forward_patch(model, undo, note):
    from transformers.models.gpt2.modeling_gpt2 import GPT2MLP

    original = GPT2MLP.forward
    patch_attribute(undo, GPT2MLP, "forward", lambda self, h: original(self, h) * 0.5)


def instance_forward_patch(model, undo, note):
    from transformers.models.gpt2.modeling_gpt2 import GPT2MLP

    mlp = blocks(model)[1].mlp
    mlp.forward = types.MethodType(lambda self, h: GPT2MLP.forward(self, h) * 0.5, mlp)


def default_dtype_float64(model, undo, note):
    undo.callback(torch.set_default_dtype, torch.get_default_dtype())
    torch.set_default_dtype(torch.float64)


def sgd_step(model, undo, note):
    optimizer = torch.optim.SGD(model.module.parameters(), lr=0.01)
    ids = model.tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    with torch.enable_grad():
        logits = model.module(input_ids=ids).logits
        loss = -logits[0, -1].log_softmax(-1)[model.token_id("John")]
        loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def load_perturbed_state(model, undo, note):
    state = {k: v.clone() for k, v in model.module.state_dict().items()}
    state["transformer.h.1.mlp.c_fc.weight"] += 0.5
    model.module.load_state_dict(state)


def parameter_replaced(model, undo, note):
    mlp = blocks(model)[1].mlp.c_fc
    mlp.weight = nn.Parameter(mlp.weight.detach() * 1.5)


def model_to_double(model, undo, note):
    model.module.double()


def requires_grad_off(model, undo, note):
    model.module.requires_grad_(False)


def scale_output(module, args, output):
    return output * 0.5


def hook_added(model, undo, note):
    handle = blocks(model)[1].mlp.register_forward_hook(scale_output)
    undo.callback(handle.remove)


def pre_hook_added(model, undo, note):
    handle = blocks(model)[2].register_forward_pre_hook(
        lambda module, args, kwargs: ((args[0] * 0.5, *args[1:]), kwargs), with_kwargs=True)
    undo.callback(handle.remove)


def hook_for_removal(model, undo, note):
    note["handle"] = blocks(model)[1].mlp.register_forward_hook(scale_output)
    undo.callback(note["handle"].remove)


def hook_removed(model, undo, note):
    note["handle"].remove()


def hook_added_and_removed(model, undo, note):
    blocks(model)[1].mlp.register_forward_hook(scale_output).remove()


def global_hook_added(model, undo, note):
    from torch.nn.modules.module import register_module_forward_hook

    target = blocks(model)[1].mlp

    def hook(module, args, output):
        return output * 0.5 if module is target else None

    undo.callback(register_module_forward_hook(hook).remove)


def to_eager(model, undo, note):
    model.module.set_attn_implementation("eager")


def to_sdpa(model, undo, note):
    model.module.set_attn_implementation("sdpa")


def sae_splice(model, undo, note):
    ii.attach(model, model.transformer.h[2], ii.load_sae("demo"))
    undo.callback(ii.detach, model)


def train_then_eval(model, undo, note):
    model.module.train()
    model.module.eval()


def swapped_vocab(tokenizer: Any, a: str, b: str) -> None:
    """In place: the word-level tokenizer maps ``a`` to ``b``'s id and back."""
    import json

    from tokenizers.models import WordLevel

    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    vocab = model["vocab"]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    tokenizer.backend_tokenizer.model = WordLevel(vocab, unk_token=model["unk_token"])


def tokenizer_changed_in_place(model, undo, note):
    swapped_vocab(model.tokenizer, "store", "drink")
    assert model.tokenizer("store")["input_ids"][-1] == note["drink"]


def note_drink(model, undo, note):
    note["drink"] = model.token_id("drink")


def tokenizer_replaced(model, undo, note):
    other = copy.deepcopy(model.tokenizer)
    swapped_vocab(other, "store", "drink")
    model.tokenizer = other


class Scale(nn.Module):
    """A parametrization whose factor is a plain attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.factor = 1.0

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.factor


def parametrize_weight(model, undo, note):
    from torch.nn.utils import parametrize

    note["scale"] = Scale()
    parametrize.register_parametrization(blocks(model)[1].mlp.c_fc, "weight", note["scale"])
    model.module.eval()     # the new modules come in train mode, which would turn reuse off


def parametrization_factor(model, undo, note):
    note["scale"].factor = 3.0


def rotary(model: ii.Model) -> nn.Module:
    return model.module.model.rotary_emb


def inv_freq_flipped(model, undo, note):
    inv_freq = rotary(model).inv_freq
    inv_freq.data.copy_(inv_freq.data.flip(0))


def inv_freq_reassigned(model, undo, note):
    rotary(model).inv_freq = rotary(model).inv_freq * 0.5


def inv_freq_scaled_in_place(model, undo, note):
    rotary(model).inv_freq.mul_(0.5)


def variance_epsilon(model, undo, note):
    model.module.model.norm.variance_epsilon = 1.0


def llama_attn_scaling(model, undo, note):
    blocks(model)[0].self_attn.scaling = 1.0


def rotary_attention_scaling(model, undo, note):
    rotary(model).attention_scaling = 2.0


def module_function_patch(model, undo, note):
    """A global of the modeling file the forward calls: no rotation at all."""
    from transformers.models.llama import modeling_llama

    patch_attribute(undo, modeling_llama, "apply_rotary_pos_emb", lambda q, k, cos, sin: (q, k))


def attention_function_overridden(model, undo, note):
    """The SDPA entry of transformers' attention registry replaced (the key stays 'sdpa')."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    original = ALL_ATTENTION_FUNCTIONS["sdpa"]

    def halved(module, *args, **kwargs):
        out, weights = original(module, *args, **kwargs)
        return out * 0.5, weights

    assert "sdpa" not in ALL_ATTENTION_FUNCTIONS._local_mapping
    ALL_ATTENTION_FUNCTIONS["sdpa"] = halved
    undo.callback(ALL_ATTENTION_FUNCTIONS._local_mapping.pop, "sdpa")


def sliding_window(size: int | None) -> Callable:
    def change(model, undo, note):
        model.module.config.sliding_window = size
    return change


CHANGES = [
    # found in issue 27: `.data` edits that keep the sum of the bits
    Change("demo-tied-embedding-rows-swapped", "demo", swap_tied_rows),
    Change("demo-data-copy-flip", "demo", flip_copy),
    Change("demo-data-setitem-roll", "demo", roll_setitem),
    Change("llama-inv-freq-flipped", "llama", inv_freq_flipped),
    # plain attributes the forward reads
    Change("demo-ln-f-eps", "demo", ln_f_eps),
    Change("llama-norm-variance-epsilon", "llama", variance_epsilon),
    Change("llama-self-attn-scaling", "llama", llama_attn_scaling),
    Change("llama-rotary-attention-scaling", "llama", rotary_attention_scaling),
    # a forward patched on the class; config fields the forward reads; the default dtype
    Change("demo-class-forward-patch", "demo", class_forward_patch),
    Change("mistral-config-sliding-window-shrunk", "mistral", sliding_window(3)),
    # (the fresh sweep crashed in staircase.py with "Index put requires the source and
    # destination dtypes match"; where it runs, a float32 model gives the numbers it gave
    # before: the point is that the second sweep does what a fresh one does)
    Change("demo-default-dtype-float64", "demo", default_dtype_float64, changes_values=False),
    # more: weights
    Change("demo-numpy-view-edit", "demo", numpy_swap),
    Change("demo-sgd-step", "demo", sgd_step),
    Change("demo-load-state-dict", "demo", load_perturbed_state),
    Change("demo-parameter-replaced", "demo", parameter_replaced),
    Change("demo-model-double", "demo", model_to_double),
    Change("demo-requires-grad-off", "demo", requires_grad_off, changes_values=False),
    # buffers
    Change("llama-inv-freq-reassigned", "llama", inv_freq_reassigned),
    Change("llama-inv-freq-scaled-in-place", "llama", inv_freq_scaled_in_place),
    # attributes, patches
    Change("demo-attn-scaling", "demo", gpt2_attn_scaling),
    Change("demo-parametrization-attribute", "demo", parametrization_factor,
           prepare=parametrize_weight),
    Change("demo-instance-forward-patch", "demo", instance_forward_patch),
    Change("llama-module-function-patch", "llama", module_function_patch),
    Change("llama-attention-function-overridden", "llama", attention_function_overridden),
    # config
    Change("mistral-config-sliding-window-removed", "mistral", sliding_window(None),
           prepare=sliding_window(3)),
    # hooks and splices
    Change("demo-forward-hook-added", "demo", hook_added),
    Change("demo-forward-pre-hook-added", "demo", pre_hook_added),
    Change("demo-forward-hook-removed", "demo", hook_removed, prepare=hook_for_removal),
    # a no-op: the model is as it was; the first result may be reused
    Change("demo-hook-added-and-removed", "demo", hook_added_and_removed,
           changes_values=False),
    Change("demo-global-forward-hook", "demo", global_hook_added),
    # the SAE's error term is kept: the same numbers up to rounding, maybe exactly
    Change("demo-sae-splice", "demo", sae_splice, changes_values=False),
    # attention implementation: equal up to float rounding, maybe exactly
    Change("demo-attn-sdpa-to-eager", "demo", to_eager, changes_values=False),
    Change("llama-attn-eager-to-sdpa", "llama", to_sdpa, prepare=to_eager,
           changes_values=False),
    # a no-op: dropout is 0 and the model is back in eval mode
    Change("demo-train-then-eval", "demo", train_then_eval, changes_values=False),
    # the tokenizer ("store" and "drink" swap ids: other token ids for the same prompts)
    Change("demo-tokenizer-changed-in-place", "demo", tokenizer_changed_in_place,
           prepare=note_drink),
    Change("demo-tokenizer-replaced", "demo", tokenizer_replaced),
]

IDS = [change.id for change in CHANGES]
assert len(set(IDS)) == len(IDS)


@pytest.mark.parametrize("change", CHANGES, ids=IDS)
def test_the_same_sweep_after_a_change_equals_a_fresh_one(demo, change):
    model = build(change.model, demo)
    with ExitStack() as undo:
        note: dict = {}
        if change.prepare:
            change.prepare(model, undo, note)
        first = sweep(model)
        assert not first.extra.get("reused")
        again = sweep(model)                   # before the change: reuse is right
        assert_same(again, fresh(lambda: sweep(model)), "the repeated sweep before the change")
        sweep(model)                           # kept again for the sweep after the change
        change.apply(model, undo, note)
        second = attempt(lambda: sweep(model))
        want = fresh(lambda: sweep(model))
        assert_same(second, want, "the sweep after the change")
        if change.changes_values:
            assert_differs(first, want, change.id)


# -- the recorded runs: another sweep after the change ------------------------------------------

PROB = ii.prob("Mary")
VARIANTS = {
    # (sweeps before the change besides S, the sweep after it)
    "metric": ([], dict(metric=PROB)),
    "site": ([dict(site="attn_out", metric=PROB)], dict(site="attn_out")),
    "method": ([dict(method="attribution", metric=PROB)], dict(method="attribution")),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("change", CHANGES, ids=IDS)
def test_another_sweep_after_a_change_equals_a_fresh_one(demo, change, variant):
    """S (and the variant's sweep with another metric) before the change: their recordings
    are kept; after it, a sweep that no earlier one equals, against it with nothing kept."""
    before, after = VARIANTS[variant]
    model = build(change.model, demo)
    with ExitStack() as undo:
        note: dict = {}
        if change.prepare:
            change.prepare(model, undo, note)
        unchanged = fresh(lambda: sweep(model, **after))     # what the change must change
        forget()
        sweep(model)
        for options in before:
            sweep(model, **options)
        change.apply(model, undo, note)
        got = attempt(lambda: sweep(model, **after))
        want = fresh(lambda: sweep(model, **after))
        assert_same(got, want, f"the {variant} sweep after the change")
        if change.changes_values:
            assert_differs(unchanged, want, f"{change.id} ({variant})")
