"""Sweeps over the latents of a spliced SAE (``site="sae"``) equal plain-hooks oracles: a
forward hook on the target module doing the splice's arithmetic by hand, one prompt at a
time (prompts of different lengths in the sweep's batch), within 1e-5 in float32, on GPT-2,
NeoX and Llama shapes and the demo model; exact patching, attribution (error term detached)
and AtP*'s GradDrop."""

from __future__ import annotations

import pytest
import torch

import ipy_intervene as ii
from conftest import CORRUPT, LAYERS, PROMPT, TinySAE, checksum, hook_count, layers
from ipy_intervene.errors import InputError, SiteError
from ipy_intervene.features import attach, detach

CLEAN = [PROMPT, "Then , Mary and John had a drink"]          # 15 and 9 tokens
CORRUPTED = [CORRUPT, "Then , Mary and Tom had a drink"]
WIDTH = 16


def first(out):
    return out[0] if isinstance(out, tuple) else out


def replace(out, new):
    return (new, *out[1:]) if isinstance(out, tuple) else new


def metric_fn(model):
    good, bad = model.token_id("Mary"), model.token_id("John")
    return lambda logits: logits[:, -1, good] - logits[:, -1, bad]


def latents_of(module, target, sae, kwargs, transcoder=False):
    """The SAE's latents at ``target`` in one plain forward."""
    seen = {}

    def hook(m, args, out):
        seen["lat"] = sae.encode(args[0] if transcoder else first(out))
    handle = target.register_forward_hook(hook)
    try:
        with torch.no_grad():
            module(**kwargs)
    finally:
        handle.remove()
    return seen["lat"]


@torch.no_grad()
def oracle_activation(model, target, sae, base_prompts, source_prompts, cells, length,
                      transcoder=False):
    """[cells, prompts]: one prompt at a time, each cell a forward with one latent of the
    base run set to the source's, output decode(lat2) + (x - decode(lat))."""
    module, metric = model.module, metric_fn(model)
    out = torch.zeros(len(cells), len(base_prompts))
    for i, (base_text, source_text) in enumerate(zip(base_prompts, source_prompts)):
        base, source = model.prepare([base_text]).kwargs, model.prepare([source_text]).kwargs
        pad = length - base["input_ids"].shape[1]
        src = latents_of(module, target, sae, source, transcoder)
        plain = metric(module(**base).logits)
        for c, (j, p) in enumerate(cells):
            if p < pad:                       # a padding position of this prompt
                out[c, i] = plain
                continue

            def hook(m, args, o, j=j, p=p - pad):
                x = first(o)
                lat = sae.encode(args[0] if transcoder else x)
                lat2 = lat.clone()
                lat2[0, p, j] = src[0, p, j]
                return replace(o, sae.decode(lat2) + (x - sae.decode(lat)))
            handle = target.register_forward_hook(hook)
            try:
                out[c, i] = metric(module(**base).logits)
            finally:
                handle.remove()
    return out


def oracle_attribution(model, target, sae, base_prompts, source_prompts, cells, length,
                       cut=None, term_only=False):
    """[cells, prompts]: score + (source - base) * d metric / d latents, the error term
    detached (``term_only``: without the score); ``cut`` (a block): its residual
    contribution cut from the gradient."""
    module, metric = model.module, metric_fn(model)
    out = torch.zeros(len(cells), len(base_prompts))
    for i, (base_text, source_text) in enumerate(zip(base_prompts, source_prompts)):
        base, source = model.prepare([base_text]).kwargs, model.prepare([source_text]).kwargs
        pad = length - base["input_ids"].shape[1]
        src = latents_of(module, target, sae, source)
        seen, handles = {}, []

        def hook(m, args, o):
            x = first(o)
            lat = sae.encode(x)
            with torch.no_grad():
                error = x - sae.decode(lat)
            seen["lat"] = lat
            return replace(o, sae.decode(lat) + error)
        handles.append(target.register_forward_hook(hook))
        if cut is not None:
            handles.append(cut.register_forward_pre_hook(
                lambda m, a, k: seen.__setitem__("in", a[0] if a else k["hidden_states"]),
                with_kwargs=True))
            handles.append(cut.register_forward_hook(
                lambda m, a, o: replace(o, seen["in"] + (first(o) - seen["in"]).detach())))
        try:
            with torch.enable_grad():
                score = metric(module(**base).logits)
                (grad,) = torch.autograd.grad(score.sum(), [seen["lat"]])
        finally:
            for h in handles:
                h.remove()
        term = (src - seen["lat"].detach()) * grad
        for c, (j, p) in enumerate(cells):
            out[c, i] = (0.0 if term_only else score.detach()) + (
                term[0, p - pad, j] if p >= pad else 0.0)
    return out


def cells_of(result):
    return [(j, p) for j in result.latents for p in result.positions]


@pytest.fixture
def spliced(arch_model):
    """(path of block 1, that block, model, sae): a random SAE, detached after."""
    arch, model = arch_model
    sae = TinySAE(model.config.hidden_size)
    yield f"{'.'.join(LAYERS[arch])}[1]", layers(model, arch)[1], model, sae
    detach(model)


def test_latent_patching_equals_plain_hooks_with_padded_batches(spliced):
    path, target, model, sae = spliced
    attach(model, path, sae)
    result = ii.patch_sweep(model, CLEAN, CORRUPTED, ii.logit_diff("Mary", "John"),
                            site="sae")
    assert result.dims == ("latent", "pos") and result.values.shape == (WIDTH, 15)
    detach(model)
    expected = oracle_activation(model, target, sae, CORRUPTED, CLEAN, cells_of(result), 15)
    torch.testing.assert_close(result.per_prompt.reshape(expected.shape), expected,
                               atol=1e-5, rtol=0)
    assert expected.std() > 1e-3            # the patches do move the metric


def test_latents_at_one_position_inside_a_block_and_noising(spliced):
    path, target, model, sae = spliced
    attach(model, f"{path}.mlp", sae, name="mlp_sae")
    result = ii.patch_sweep(model, CLEAN, CORRUPTED, ii.logit_diff("Mary", "John"),
                            site=f"mlp_sae:{path}.mlp",
                            positions=[-1, 10], latents=[3, 0, 7], direction="noising",
                            batch_size=2)
    assert result.latents == [3, 0, 7] and result.positions == [14, 10]
    detach(model)
    expected = oracle_activation(model, target.mlp, sae, CLEAN, CORRUPTED, cells_of(result),
                                 15)
    torch.testing.assert_close(result.per_prompt.reshape(expected.shape), expected,
                               atol=1e-5, rtol=0)


def test_transcoder_latents_equal_plain_hooks(demo):
    mlp = demo.module.transformer.h[2].mlp
    sae = TinySAE(demo.config.n_embd, seed=3)
    attach(demo, demo.transformer.h[2].mlp, sae, name="tc", kind="transcoder")
    try:
        result = ii.patch_sweep(demo, PROMPT, CORRUPT, ii.logit_diff("Mary", "John"), site="tc")
    finally:
        detach(demo)
    expected = oracle_activation(demo, mlp, sae, [CORRUPT], [PROMPT], cells_of(result), 15,
                                 transcoder=True)
    torch.testing.assert_close(result.per_prompt.reshape(expected.shape), expected,
                               atol=1e-5, rtol=0)


def test_latent_attribution_equals_gradient_by_hand(spliced):
    path, target, model, sae = spliced
    attach(model, path, sae)
    result = ii.patch_sweep(model, CLEAN, CORRUPTED, ii.logit_diff("Mary", "John"),
                            site="sae", method="attribution")
    detach(model)
    expected = oracle_attribution(model, target, sae, CORRUPTED, CLEAN, cells_of(result), 15)
    torch.testing.assert_close(result.per_prompt.reshape(expected.shape), expected,
                               atol=1e-5, rtol=0)
    assert (expected - expected[:1]).abs().max() > 1e-3  # gradients reach the latents


def test_latent_atp_star_grad_drop_equals_cut_gradients_by_hand(demo):
    blocks = demo.module.transformer.h
    sae = TinySAE(demo.config.n_embd, seed=1)
    attach(demo, demo.transformer.h[1], sae)
    try:
        plain = ii.patch_sweep(demo, CLEAN, CORRUPTED, ii.logit_diff("Mary", "John"),
                               site="sae", method="atp*", grad_drop=False)
        dropped = ii.patch_sweep(demo, CLEAN, CORRUPTED, ii.logit_diff("Mary", "John"),
                                 site="sae", method="atp*", positions=[-1, 10])
    finally:
        detach(demo)
    target = blocks[1]
    want_plain = oracle_attribution(demo, target, sae, CORRUPTED, CLEAN, cells_of(plain), 15)
    torch.testing.assert_close(plain.per_prompt.reshape(want_plain.shape), want_plain,
                               atol=1e-5, rtol=0)
    cells = cells_of(dropped)
    with torch.no_grad():
        score = torch.stack([metric_fn(demo)(demo.module(**demo.prepare([t]).kwargs).logits)[0]
                             for t in CORRUPTED])
    # I_0 = I (layer 0 is before the latent's layer 1), I_1 = 0, I_2 and I_3 cut by hand
    terms = [oracle_attribution(demo, target, sae, CORRUPTED, CLEAN, cells, 15,
                                cut=cut, term_only=True).abs()
             for cut in (None, blocks[2], blocks[3])]
    magnitude = sum(terms) / 3
    torch.testing.assert_close(dropped.per_prompt.reshape(magnitude.shape), score + magnitude,
                               atol=1e-5, rtol=0)
    assert dropped.extra["estimate"] == "magnitude"


def test_unknown_latent_site_names_the_attached_ones(demo):
    attach(demo, demo.transformer.h[2], TinySAE(demo.config.n_embd))
    try:
        with pytest.raises(SiteError, match=r"sae:transformer\.h\[2\]"):
            ii.patch_sweep(demo, PROMPT, CORRUPT, ii.logit_diff("Mary", "John"), site="sea")
        with pytest.raises(SiteError, match="no splice named"):
            ii.patch_sweep(demo, PROMPT, CORRUPT, ii.logit_diff("Mary", "John"),
                           site="sae:transformer.h[1]")
        with pytest.raises(SiteError, match="latent 99 is out of range"):
            ii.patch_sweep(demo, PROMPT, CORRUPT, ii.logit_diff("Mary", "John"), site="sae",
                           latents=[99])
        with pytest.raises(InputError, match="layers, window do not apply"):
            ii.patch_sweep(demo, PROMPT, CORRUPT, ii.logit_diff("Mary", "John"), site="sae",
                           layers=[1], window=3)
        with pytest.raises(InputError, match="latent site 'sae:transformer.h.2.' is swept"):
            ii.patch_sweep(demo, PROMPT, CORRUPT, ii.logit_diff("Mary", "John"), site="sae",
                           method="path")
        with pytest.raises(InputError, match="latents= selects"):
            ii.patch_sweep(demo, PROMPT, CORRUPT, ii.logit_diff("Mary", "John"),
                           site="resid_pre", latents=[1])
    finally:
        detach(demo)
    with pytest.raises(SiteError, match="unknown site 'sae'; sweep sites: resid_pre"):
        ii.patch_sweep(demo, PROMPT, CORRUPT, ii.logit_diff("Mary", "John"), site="sae")


def test_failing_latent_sweep_leaves_no_hook_and_the_weights(demo):
    sae = TinySAE(demo.config.n_embd)
    attach(demo, demo.transformer.h[2], sae)
    try:
        hooks, weights = hook_count(demo.module), checksum(demo.module)

        def broken(logits):
            raise RuntimeError("metric broke")
        for method in ("activation", "attribution", "atp*"):
            with pytest.raises(Exception, match="metric broke"):
                ii.patch_sweep(demo, PROMPT, CORRUPT, broken, site="sae", method=method)
            assert hook_count(demo.module) == hooks
            assert checksum(demo.module) == weights
            assert all(p.grad is None for p in demo.module.parameters())
    finally:
        detach(demo)


def test_latent_sweep_result_shows_latents(demo):
    attach(demo, demo.transformer.h[2], TinySAE(demo.config.n_embd))
    try:
        result = ii.patch_sweep(demo, PROMPT, CORRUPT, ii.logit_diff("Mary", "John"),
                                site="sae", positions=[-1])
    finally:
        detach(demo)
    top = result.top(1)[0]
    assert set(top) == {"latent", "pos", "token", "value"}
    assert "latents" in repr(result) and f"#{top['latent']}" in repr(result)
    bundle = result._repr_mimebundle_()
    assert "image/svg+xml" in bundle and "latent" in bundle["text/html"]
    tokens = result.patcher.top_tokens((result.latents.index(top["latent"]), 0), k=2)
    assert len(tokens) == 2


@pytest.mark.parametrize("method", ["atp*", "attribution"])
def test_screen_and_verify_on_latents(demo, method):
    attach(demo, demo.transformer.h[2], TinySAE(demo.config.n_embd, seed=2))
    try:
        metric = ii.logit_diff("Mary", "John")
        s = ii.screen_and_verify(demo, CLEAN, CORRUPTED, metric, site="sae", top=4,
                                 method=method, check=True, positions=[-1, 10, 12])
        screen = ii.patch_sweep(demo, CLEAN, CORRUPTED, metric, site="sae", method=method,
                                positions=[-1, 10, 12])
    finally:
        detach(demo)
    torch.testing.assert_close(s.screen.values, screen.values)
    assert s.screen.dims == ("latent", "pos") and len(s.cells) == 4
    for cell in s.cells:
        assert cell["exact"] == pytest.approx(float(s.exact.values[cell["index"]]), abs=1e-6)
        assert cell["latent"] == s.screen.latents[cell["index"][0]]
    assert 0 <= s.caught <= 4
    assert "image/svg+xml" in s._repr_mimebundle_()


def test_magic_sweeps_a_latent_site(shell, demo):
    sae = TinySAE(demo.config.n_embd, seed=4)
    attach(demo, demo.transformer.h[2], sae)
    shell.user_ns.update(clean=CLEAN, corrupt=CORRUPTED)
    try:
        shell.run_cell('%patch_sweep model --clean clean --corrupted corrupt --metric '
                       'logit_diff("Mary", "John") --site sae:transformer.h[2] '
                       '--positions [-1, 10] --quiet --out lat')
        expected = ii.patch_sweep(demo, CLEAN, CORRUPTED, ii.logit_diff("Mary", "John"),
                                  site="sae", positions=[-1, 10])
    finally:
        detach(demo)
    got = shell.user_ns["lat"]
    assert got.site == "sae:transformer.h[2]" and got.dims == ("latent", "pos")
    torch.testing.assert_close(got.values, expected.values)


@torch.no_grad()
def test_latent_causal_tracing_equals_noised_runs_by_hand(demo):
    """method="noise": the subject's embeddings noised (samples copies), one latent restored
    to its clean value; the metric averaged over the copies."""
    module, block = demo.module, demo.module.transformer.h[2]
    sae = TinySAE(demo.config.n_embd, seed=5)
    attach(demo, demo.transformer.h[2], sae)
    try:
        result = ii.patch_sweep(demo, PROMPT, metric=ii.logit_diff("Mary", "John"),
                                site="sae", method="noise", subject=[1, 3], samples=3,
                                seed=7, latents=range(8), positions=[1, 5, 14])
    finally:
        detach(demo)
    kwargs = demo.prepare([PROMPT]).kwargs
    emb = module.transformer.wte(kwargs["input_ids"])
    std = 3.0 * float(emb[0, [1, 3]].std())
    noise = torch.randn(3, 1, 15, demo.config.n_embd,
                        generator=torch.Generator().manual_seed(7)) * std
    keep = torch.zeros(15, dtype=torch.bool)
    keep[[1, 3]] = True
    noise = noise * keep[None, None, :, None]
    clean = latents_of(module, block, sae, kwargs)
    metric = metric_fn(demo)
    expected = torch.zeros(8 * 3)
    for c, (j, p) in enumerate((j, p) for j in range(8) for p in (1, 5, 14)):
        scores = []
        for s in range(3):
            def restore(m, a, o, j=j, p=p):
                x = first(o)
                lat = sae.encode(x)
                lat2 = lat.clone()
                lat2[0, p, j] = clean[0, p, j]
                return replace(o, sae.decode(lat2) + (x - sae.decode(lat)))
            handles = [module.transformer.wte.register_forward_hook(
                lambda m, a, o, s=s: o + noise[s]), block.register_forward_hook(restore)]
            try:
                scores.append(metric(module(**kwargs).logits))
            finally:
                for h in handles:
                    h.remove()
        expected[c] = torch.stack(scores).mean()
    torch.testing.assert_close(result.raw.flatten(), expected, atol=1e-5, rtol=0)
    assert result.direction == "causal tracing" and expected.std() > 1e-4


def test_a_wide_latent_grid_shows_its_strongest_latents(demo):
    attach(demo, demo.transformer.h[2], TinySAE(demo.config.n_embd, m=96, seed=6))
    try:
        result = ii.patch_sweep(demo, PROMPT, CORRUPT, ii.logit_diff("Mary", "John"),
                                site="sae", positions=[-1, 10])
    finally:
        detach(demo)
    view = result.show()
    assert len(view.rows) == 40 and "40 of 96 latents" in view.figure.layout.title.text
    strongest = result.top(1)[0]
    assert f"#{strongest['latent']}" in view.rows
    index = view.index()                          # the selection, as a grid index
    assert result.latents[index[0]] == strongest["latent"]
    shown = [int(label[1:]) for label in view.rows]
    effect = (result.values - result.unpatched).abs().amax(1)
    hidden = [j for j in result.latents if j not in shown]
    assert float(effect[hidden].max()) <= float(effect[shown].min())
    assert "#" in result._repr_mimebundle_()["image/svg+xml"]
