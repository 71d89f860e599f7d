"""Dictionaries spliced at a site (ipy_intervene.features.splice): latents read and written in
traces equal a plain-hooks oracle run one prompt at a time, on GPT-2, NeoX, Llama and the demo."""

from __future__ import annotations

import pytest
import torch

import ipy_intervene as ii
from ipy_intervene.errors import InputError, SiteError
from ipy_intervene.features import SAE, attach, attached, detach
from tests.conftest import LAYERS, PROMPT, SHORT, checksum, hook_count, hooks

PROMPTS = [PROMPT, SHORT]          # different lengths: the batch is left-padded


def make_sae(d_in: int, d_sae: int = 64, seed: int = 0, **kw) -> SAE:
    """A random SAE whose latents are mostly active (so edits change the output)."""
    gen = torch.Generator().manual_seed(seed)
    sae = SAE(d_in, d_sae, **kw)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
        sae.b_enc.add_(0.5)
    return sae


def block_path(arch: str, layer: int = 2) -> str:
    top, name = LAYERS[arch]
    return f"{top}.{name}[{layer}]"


def case(request, demo):
    arch = request.param
    if arch == "demo":
        return "gpt2", demo
    from tests.conftest import tiny_model
    return arch, ii.wrap(tiny_model(arch, len(demo.tokenizer)), demo.tokenizer)


@pytest.fixture(params=["gpt2", "neox", "llama", "demo"])
def spliced(request, demo):
    """(arch, model, sae, hooks before attaching) with an SAE at layer 2; detached after."""
    arch, model = case(request, demo)
    before = hook_count(model.module)
    width = model.module.config.hidden_size
    sae = make_sae(width)
    attach(model, block_path(arch), sae)
    yield arch, model, sae, before
    detach(model)


def by_hand(sae: SAE, x: torch.Tensor) -> torch.Tensor:
    """The latents, written out."""
    return torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc)


def oracle(model, arch, sae, prompt, edit=None, drop_error=False):
    """One prompt, plain forward hook on the block: (latents, logits), the splice by hand."""
    seen = {}

    def hook(module, args, out):
        x = out[0] if isinstance(out, tuple) else out
        lat = by_hand(sae, x)
        seen["lat"] = lat  # a cell's read and its in-place edit are the same tensor
        error = torch.zeros_like(x) if drop_error else x - (lat @ sae.W_dec + sae.b_dec)
        if edit is not None:
            edit(lat)
        new = lat @ sae.W_dec + sae.b_dec + error
        return (new, *out[1:]) if isinstance(out, tuple) else new

    ids = model.tokenizer(prompt, return_tensors="pt").input_ids
    block = model.module.get_submodule(block_path(arch).replace("[", ".").rstrip("]"))
    with torch.no_grad(), hooks((block, hook)):
        logits = model.module(ids).logits
    return seen["lat"], logits


def at_end(batched: torch.Tensor, row: int, n: int) -> torch.Tensor:
    return batched[row, -n:]


def test_unedited_forward_is_unchanged_bit_for_bit(spliced):
    arch, model, sae, _ = spliced
    ns = {}
    ii.trace(model, "logits = model.lm_head.output", PROMPTS, namespace=ns)
    detach(model)
    plain = {}
    ii.trace(model, "logits = model.lm_head.output", PROMPTS, namespace=plain)
    attach(model, block_path(arch), sae)
    assert torch.equal(ns["logits"], plain["logits"])


def active_latent(model, arch, sae) -> int:
    """A latent active at the last position of every prompt (so zeroing it changes things)."""
    lasts = torch.stack([oracle(model, arch, sae, p)[0][0, -1] for p in PROMPTS])
    assert float(lasts.min(0).values.max()) > 0
    return int(lasts.min(0).values.argmax())


def test_latent_read_and_write_equal_plain_hooks(spliced):
    arch, model, sae, _ = spliced
    site = f"model.{block_path(arch)}.sae.latents.output"
    j = active_latent(model, arch, sae)
    ns = {}
    ii.trace(model, f"lat = {site}\n{site}[:, -1, {j}] = 0\nlogits = model.lm_head.output",
             PROMPTS, namespace=ns)
    moved = 0.0
    for row, prompt in enumerate(PROMPTS):
        def zero(lat):
            lat[:, -1, j] = 0
        lat, logits = oracle(model, arch, sae, prompt, edit=zero)
        _, clean = oracle(model, arch, sae, prompt)
        n = lat.shape[1]
        assert ns["lat"].shape == (len(PROMPTS), ns["logits"].shape[1], sae.d_sae)
        keep = torch.ones_like(lat[0], dtype=torch.bool)
        keep[-1, j] = False  # the read is exact wherever the edit did not write
        torch.testing.assert_close(at_end(ns["lat"], row, n)[keep], lat[0][keep], atol=1e-5,
                                   rtol=1e-5)
        torch.testing.assert_close(at_end(ns["logits"], row, n), logits[0], atol=1e-5, rtol=0)
        moved = max(moved, float((logits - clean).abs().max()))
    assert moved > 1e-4


def test_replacing_the_latents_and_dropping_the_error(spliced):
    arch, model, sae, _ = spliced
    sae_path = f"model.{block_path(arch)}.sae"
    ns = {}
    ii.trace(model, f"{sae_path}.latents.output = {sae_path}.latents.output * 2\n"
                    f"{sae_path}.error.output[:] = 0\nlogits = model.lm_head.output",
             PROMPTS, namespace=ns)
    for row, prompt in enumerate(PROMPTS):
        _, logits = oracle(model, arch, sae, prompt, edit=lambda lat: lat.mul_(2),
                           drop_error=True)
        n = logits.shape[1]
        torch.testing.assert_close(at_end(ns["logits"], row, n), logits[0], atol=1e-5, rtol=0)


def test_attribution_reaches_the_latents_through_the_decoder(spliced):
    arch, model, sae, _ = spliced
    site = f"model.{block_path(arch)}.sae.latents.output"
    ns = {}
    ii.trace(model, f"lat = {site}\nlat.retain_grad()\nlogits = model.lm_head.output\n"
                    "loss = logits[0, -1].log_softmax(-1)[5]\nloss.backward()\ngrad = lat.grad",
             PROMPT, namespace=ns, grad=True)
    seen = {}

    def hook(module, args, out):
        x = out[0] if isinstance(out, tuple) else out
        lat = by_hand(sae, x)
        lat.retain_grad()
        seen["lat"] = lat
        error = (x - (lat @ sae.W_dec + sae.b_dec)).detach()
        new = lat @ sae.W_dec + sae.b_dec + error
        return (new, *out[1:]) if isinstance(out, tuple) else new

    block = model.module.get_submodule(block_path(arch).replace("[", ".").rstrip("]"))
    ids = model.tokenizer(PROMPT, return_tensors="pt").input_ids
    detach(model)
    try:
        with hooks((block, hook)):
            logits = model.module(ids).logits
        logits[0, -1].log_softmax(-1)[5].backward()
    finally:
        attach(model, block_path(arch), sae)
        model.module.zero_grad(set_to_none=True)
        sae.zero_grad(set_to_none=True)
    assert ns["grad"] is not None and float(ns["grad"].abs().sum()) > 0
    torch.testing.assert_close(ns["grad"], seen["lat"].grad, atol=1e-5, rtol=0)


def test_detach_leaves_no_hook_and_no_child(spliced):
    arch, model, sae, before = spliced
    keys = set(model.module.state_dict())
    assert any(k.endswith("sae.dictionary.W_enc") for k in keys)
    assert list(attached(model)) == [f"{block_path(arch)}.sae"]
    assert hook_count(model.module) > before
    detach(model)
    assert hook_count(model.module) == before and attached(model) == {}
    assert not any("sae" in k for k in model.module.state_dict())
    with pytest.raises(SiteError):
        ii.trace(model, f"lat = model.{block_path(arch)}.sae.latents.output", PROMPT)
    attach(model, block_path(arch), sae)


def test_a_failing_cell_leaves_the_splice_as_it_was(spliced):
    arch, model, sae, before = spliced
    weights, spliced_hooks = checksum(model.module), hook_count(model.module)
    ns = {}
    ii.trace(model, "logits = model.lm_head.output", PROMPTS, namespace=ns)
    site = f"model.{block_path(arch)}.sae.latents.output"
    with pytest.raises(ZeroDivisionError):
        ii.trace(model, f"{site}[:, -1] = 0\nlat = {site}\nx = 1 / 0", PROMPTS, namespace=ns)
    assert "lat" not in ns
    assert hook_count(model.module) == spliced_hooks and checksum(model.module) == weights
    assert list(attached(model)) == [f"{block_path(arch)}.sae"]
    after = {}
    ii.trace(model, "logits = model.lm_head.output", PROMPTS, namespace=after)
    assert torch.equal(after["logits"], ns["logits"])


def test_attach_by_path_and_detach_one(demo):
    before = hook_count(demo.module)
    a = attach(demo, "transformer.h[-1]", make_sae(128), name="sae")
    b = attach(demo, demo.transformer.h[1], make_sae(128, seed=1), name="dict")
    try:
        assert a.target_path == "transformer.h[3]"
        assert set(attached(demo)) == {"transformer.h[3].sae", "transformer.h[1].dict"}
        detach(demo, demo.transformer.h[3])
        assert set(attached(demo)) == {"transformer.h[1].dict"} and b.kind == "output"
        with pytest.raises(SiteError, match="no splice at"):
            detach(demo, "transformer.h[0]")
    finally:
        detach(demo)
    assert hook_count(demo.module) == before


def test_attach_errors_are_clear_and_change_nothing(demo):
    before, weights = hook_count(demo.module), checksum(demo.module)
    with pytest.raises(InputError, match="no `encode` method"):
        attach(demo, "transformer.h[2]", torch.nn.Linear(128, 8))
    with pytest.raises(SiteError, match="already has a child"):
        attach(demo, "transformer.h[2]", make_sae(128), name="mlp")
    with pytest.raises(SiteError, match="no module at"):
        attach(demo, "transformer.hh[2]", make_sae(128))
    with pytest.raises(InputError, match="kind="):
        attach(demo, "transformer.h[2]", make_sae(128), kind="input")
    attach(demo, "transformer.h[2]", make_sae(128))
    try:
        with pytest.raises(SiteError, match="already holds a splice"):
            attach(demo, "transformer.h[2]", make_sae(128), name="other")
    finally:
        detach(demo)
    assert hook_count(demo.module) == before and checksum(demo.module) == weights


def test_a_dictionary_of_the_wrong_width_is_a_clear_error(demo):
    before = hook_count(demo.module)
    attach(demo, "transformer.h[2]", make_sae(64))
    try:
        with pytest.raises(ii.InterventionError, match="width d_in=64"):
            ii.trace(demo, "logits = model.lm_head.output", PROMPT)
    finally:
        detach(demo)
    assert hook_count(demo.module) == before


def test_an_edit_under_grad_keeps_the_backward_and_equals_plain_hooks(spliced):
    arch, model, sae, _ = spliced
    j = active_latent(model, arch, sae)
    site = f"model.{block_path(arch)}.sae.latents.output"
    ns = {}
    ii.trace(model, f"{site}[:, -1, {j}] = 0\nlat = {site}\nlat.retain_grad()\n"
                    "logits = model.lm_head.output\nlogits[0, -1, 5].backward()\ngrad = lat.grad",
             PROMPT, namespace=ns, grad=True)
    seen = {}

    def hook(module, args, out):
        x = out[0] if isinstance(out, tuple) else out
        lat = by_hand(sae, x).clone()
        error = (x - (lat @ sae.W_dec + sae.b_dec)).detach()
        lat[:, -1, j] = 0
        lat.retain_grad()
        seen["lat"] = lat
        new = lat @ sae.W_dec + sae.b_dec + error
        return (new, *out[1:]) if isinstance(out, tuple) else new

    block = model.module.get_submodule(block_path(arch).replace("[", ".").rstrip("]"))
    detach(model)
    try:
        with hooks((block, hook)):
            logits = model.module(model.tokenizer(PROMPT, return_tensors="pt").input_ids).logits
        logits[0, -1, 5].backward()
    finally:
        attach(model, block_path(arch), sae)
        model.module.zero_grad(set_to_none=True)
        sae.zero_grad(set_to_none=True)
    torch.testing.assert_close(ns["logits"], logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(ns["grad"], seen["lat"].grad, atol=1e-5, rtol=0)
    assert float(ns["grad"].abs().sum()) > 0


def test_a_bfloat16_model_with_a_float32_sae(demo):
    model = ii.load_model("demo", dtype=torch.bfloat16)
    sae = make_sae(128)
    ns = {}
    ii.trace(model, "logits = model.lm_head.output", PROMPT, namespace=ns)
    attach(model, "transformer.h[2]", sae)
    try:
        ii.trace(model, "same = model.lm_head.output\n"
                        "model.transformer.h[2].sae.latents.output[:, -1] *= 2\n", PROMPT,
                 namespace=ns)
        ii.trace(model, "model.transformer.h[2].sae.latents.output[:, -1] *= 2\n"
                        "edited = model.lm_head.output", PROMPT, namespace=ns)
    finally:
        detach(model)
    assert torch.equal(ns["same"], ns["logits"]) and ns["edited"].dtype == torch.bfloat16

    def hook(module, args, out):
        x = out[0] if isinstance(out, tuple) else out
        lat = by_hand(sae, x.float())
        error = x.float() - (lat @ sae.W_dec + sae.b_dec)
        lat[:, -1] *= 2
        new = (lat @ sae.W_dec + sae.b_dec + error).to(x.dtype)
        return (new, *out[1:]) if isinstance(out, tuple) else new

    with torch.no_grad(), hooks((model.module.transformer.h[2], hook)):
        want = model.module(model.tokenizer(PROMPT, return_tensors="pt").input_ids).logits
    assert torch.equal(ns["edited"], want)


def test_a_module_without_a_tensor_output_is_a_clear_error(demo):
    before = hook_count(demo.module)
    attach(demo, "transformer", make_sae(128))
    try:
        with pytest.raises(ii.InterventionError, match="needs a tensor"):
            ii.trace(demo, "logits = model.lm_head.output", PROMPT)
    finally:
        detach(demo)
    assert hook_count(demo.module) == before


def test_a_splice_edits_every_generation_step(demo):
    sae = make_sae(128)
    attach(demo, "transformer.h[2]", sae)
    ns = {}
    try:
        ii.trace(demo, "for step in tracer.steps():\n"
                       "    model.transformer.h[2].sae.latents.output[:, -1, :32] = 0\n"
                       "tokens = tracer.output", PROMPT, namespace=ns, generate=4,
                 ignore_eos=True)
    finally:
        detach(demo)

    def hook(module, args, out):
        x = out[0] if isinstance(out, tuple) else out
        lat = by_hand(sae, x)
        error = x - (lat @ sae.W_dec + sae.b_dec)
        lat[:, -1, :32] = 0
        new = lat @ sae.W_dec + sae.b_dec + error
        return (new, *out[1:]) if isinstance(out, tuple) else new

    enc = demo.tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad(), hooks((demo.module.transformer.h[2], hook)):
        want = demo.module.generate(**enc, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                                    pad_token_id=demo.tokenizer.pad_token_id)
    plain = demo.module.generate(**enc, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                                 pad_token_id=demo.tokenizer.pad_token_id)
    assert torch.equal(ns["tokens"], want)
    assert not torch.equal(want, plain)


def test_attach_inside_a_running_trace_is_refused(demo):
    before = hook_count(demo.module)
    ns = {"sae": make_sae(128)}
    with pytest.raises(SiteError, match="between cells"):
        ii.trace(demo, "ii.attach(model, model.transformer.h[1], sae)\n"
                       "h = model.transformer.h[1].output", PROMPT, namespace={**ns, "ii": ii})
    assert attached(demo) == {} and hook_count(demo.module) == before
