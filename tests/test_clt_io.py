"""Cross-layer transcoders from circuit-tracer's folder layout (``W_enc_<l>.safetensors``,
``W_dec_<l>.safetensors``, ``config.yaml``), written here by hand, and what the loader
refuses; interventions from a CLT graph in a ``%%trace`` cell (``g.apply``): the cell's
logits equal ``g.intervene``'s unfrozen model, and with ``errors="live"`` a plain-hooks
oracle run one prompt at a time on a left-padded batch of prompts of different lengths."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import ipy_intervene as ii
from ipy_intervene.features.clt import load_clt
from tests.conftest import hook_count
from tests.test_attribution_graph import PROMPTS, parts
from tests.test_attribution_graph_trace import BATCH, GRAPH_PROMPT, edits_at, run_cell, tol
from tests.test_clt import random_clt, wrapped

CONFIG = ("model_name: tiny\nmodel_kind: cross_layer_transcoder\n"
          "feature_input_hook: hook_mlp_in\nfeature_output_hook: hook_mlp_out\n")


def save_layout(clt, folder: Path, config: str | None = CONFIG, extra: dict | None = None
                ) -> Path:
    """circuit-tracer's layout, by hand: encoders ``[d_sae, d_model]`` per layer with their
    biases (and thresholds), decoders ``[d_sae, n_layers - l, d_model]`` per source layer."""
    folder.mkdir(parents=True, exist_ok=True)
    for layer in range(clt.n_layers):
        enc = {f"W_enc_{layer}": clt.W_enc[layer].T.contiguous(),
               f"b_enc_{layer}": clt.b_enc[layer].clone(),
               f"b_dec_{layer}": clt.b_dec[layer].clone()}
        if clt.activation == "jumprelu":
            enc[f"threshold_{layer}"] = clt.threshold[layer].clone()
        enc.update((extra or {}).get(layer, {}))
        save_file(enc, str(folder / f"W_enc_{layer}.safetensors"))
        save_file({f"W_dec_{layer}": clt.W_dec[layer].detach().clone()},
                  str(folder / f"W_dec_{layer}.safetensors"))
    if config is not None:
        (folder / "config.yaml").write_text(config)
    return folder


@pytest.fixture(scope="module")
def llama(demo):
    return wrapped("llama", demo)


def test_the_layout_loads_as_written_and_a_folder_is_a_transcoders_argument(llama, tmp_path):
    clt = random_clt(3, 32, seed=3, jump=True)
    folder = save_layout(clt, tmp_path / "clt")
    back = load_clt(folder)
    assert back.activation == "jumprelu" and back.dtype == torch.float64
    for name, value in clt.state_dict().items():
        torch.testing.assert_close(back.state_dict()[name], value, rtol=0, atol=0)
    a = ii.attribution_graph(llama, PROMPTS[2], clt)
    b = ii.attribution_graph(llama, PROMPTS[2], str(folder))
    assert a.ids == b.ids and torch.equal(a.adjacency, b.adjacency)
    # without config.yaml, reads= says what the encoders read
    plain = save_layout(clt, tmp_path / "plain", config=None)
    assert torch.equal(load_clt(plain, reads="mlp_in").W_enc, clt.W_enc)


def _refusal(tmp_path, llama, how: str):
    clt = random_clt(3, 32, seed=3)
    folder = tmp_path / how
    if how == "unknown key":
        save_layout(clt, folder, extra={1: {"W_skip_1": torch.zeros(32, 32,
                                                                   dtype=torch.float64)}})
    elif how == "decoder shape":
        save_layout(clt, folder)
        save_file({"W_dec_1": torch.zeros(48, 3, 32, dtype=torch.float64)},
                  str(folder / "W_dec_1.safetensors"))
    elif how == "missing layer":
        save_layout(clt, folder)
        (folder / "W_dec_2.safetensors").unlink()
    elif how == "stray file":
        save_layout(clt, folder)
        save_file({"x": torch.zeros(1)}, str(folder / "W_skip.safetensors"))
    elif how == "resid_mid":
        save_layout(clt, folder, config=CONFIG.replace("hook_mlp_in", "hook_resid_mid"))
    elif how == "no config":
        save_layout(clt, folder, config=None)
    elif how == "config key":
        save_layout(clt, folder, config=CONFIG + "skip_connection: true\n")
    elif how == "negative threshold":
        jump = random_clt(3, 32, seed=3, jump=True)
        with torch.no_grad():
            jump.threshold[2, 5] = -0.1
        save_layout(jump, folder)
    elif how == "too few layers":
        save_layout(random_clt(2, 32, seed=3), folder)
    elif how == "wrong width":
        save_layout(random_clt(3, 16, seed=3), folder)
    return lambda: ii.attribution_graph(llama, PROMPTS[2], str(folder))


@pytest.mark.parametrize("how,why", [
    ("unknown key", "W_enc_1.safetensors holds W_skip_1, which circuit-tracer's CLT layout"),
    ("decoder shape", "W_dec_1 has shape [48, 3, 32]; expected [48, 2, 32]"),
    ("missing layer", "lacks W_dec_2.safetensors"),
    ("stray file", "W_skip.safetensors: not part of circuit-tracer's CLT layout"),
    ("resid_mid", "feature_input_hook 'hook_resid_mid'"),
    ("no config", "pass reads='mlp_in'"),
    ("config key", "skip_connection not understood"),
    ("negative threshold", "threshold_2 has negative values"),
    ("too few layers", "has 2 layers (W_enc_0 to W_enc_1); this llama model has 3"),
    ("wrong width", "W_enc_0 reads width 16; this llama model's MLPs read and write width 32"),
])
def test_what_the_loader_does_not_understand_is_refused_by_name(llama, tmp_path, how, why):
    with pytest.raises(ii.InterventionError, match=re.escape(why)):
        _refusal(tmp_path, llama, how)()


# -- interventions in a trace cell -----------------------------------------------------------

@pytest.fixture(scope="module", params=["demo", "llama"])
def case(request, demo, llama):
    if request.param == "demo":
        model, clt = demo, random_clt(4, 128, d_sae=96, seed=5, dtype=torch.float32)
    else:
        model, clt = llama, random_clt(3, 32, seed=3)
    return request.param, model, clt, ii.attribution_graph(model, GRAPH_PROMPT, clt)


@pytest.mark.parametrize("errors", ["frozen", "live"])
def test_the_cell_is_intervenes_unfrozen_model(case, errors):
    _, model, _, g = case
    edits = edits_at(g, [1, 2, 3, 4])
    logits = run_cell(model, g, GRAPH_PROMPT, edits, errors)
    r = g.intervene(edits, errors=errors)
    torch.testing.assert_close(logits[0, -1].double(), r.after.double(), **tol(model))
    assert float((r.after - r.before).abs().max()) > 1e-3
    assert hook_count(model.module) == 0


@pytest.mark.parametrize("align", ["start", "end"])
def test_live_edits_on_prompts_of_different_lengths_equal_plain_hooks(case, align):
    name, model, clt, g = case
    n = g.nodes.n_pos
    edits = edits_at(g, [1, 2, 3] if align == "start" else [n - 4, n - 3, n - 2, n - 1])
    logits = run_cell(model, g, BATCH, edits, "live", align)
    moved = 0.0
    for row, prompt in enumerate(BATCH):
        want = clt_oracle(model, clt, prompt, edits, align)
        got = logits[row, -want.shape[0]:]
        torch.testing.assert_close(got.double(), want.double(), **tol(model))
        plain = clt_oracle(model, clt, prompt, {}, align)
        moved = max(moved, float((want - plain).abs().max()))
    assert moved > 1e-3, name


def test_an_error_edit_alone_reads_every_earlier_layers_latents(case):
    """A live error edit at the last layer: its error is the MLP output minus all of the
    CLT's decoders into it, so every earlier layer's latents are needed."""
    _, model, clt, g = case
    last = g.nodes.n_layers - 1
    edits = {f"e{last}.2": ("scale", 0.0)}
    logits = run_cell(model, g, BATCH, edits, "live")
    for row, prompt in enumerate(BATCH):
        want = clt_oracle(model, clt, prompt, edits, "start")
        torch.testing.assert_close(logits[row, -want.shape[0]:].double(), want.double(),
                                   **tol(model))


@torch.no_grad()
def clt_oracle(model, clt, prompt: str, edits: dict, align: str) -> torch.Tensor:
    """One prompt, plain hooks: each MLP's own output plus the change the edits make to the
    CLT's output there (``sum_{s <= l} relu(x_s W_enc[s] + b_enc[s]) W_dec[s][:, l - s] +
    b_dec[l]``); an error node scaled by c adds (c - 1) times (output - CLT output)."""
    hf, n_graph = model.module, len(model.tokenizer(GRAPH_PROMPT)["input_ids"])
    ids = model.tokenizer(prompt, return_tensors="pt")["input_ids"]
    n = ids.shape[1]
    where = (lambda p: p) if align == "start" else (lambda p: n - (n_graph - p))
    blocks, _, mlps, _ = parts(hf)
    acts: dict = {}
    edited: dict = {}
    parsed = [(node[0], [int(v) for v in node[1:].split(".")], how)
              for node, how in edits.items()]

    def decode(layer, a):
        return clt.b_dec[layer] + sum(a[s] @ clt.W_dec[s][:, layer - s]
                                      for s in range(layer + 1))

    handles = []
    for layer, (inner, outer) in enumerate(mlps):
        box: list = []
        handles.append(inner.register_forward_hook(lambda m, a, o, box=box: box.append(a[0])))

        def hook(m, args, out, layer=layer, box=box):
            a = torch.relu(box.pop()[0] @ clt.W_enc[layer] + clt.b_enc[layer])
            acts[layer], edited[layer] = a, a.clone()
            for kind, rest, how in parsed:
                if kind == "f" and rest[0] == layer:
                    p, latent = where(rest[1]), rest[2]
                    edited[layer][p, latent] = how if not isinstance(how, tuple) \
                        else a[p, latent] * how[1]
            dec, dec2 = decode(layer, acts), decode(layer, edited)
            change = torch.zeros_like(dec)
            for kind, rest, how in parsed:
                if kind == "e" and rest[0] == layer:
                    p = where(rest[1])
                    change[p] += (how[1] - 1) * (out[0, p] - dec[p])
            return out + (dec2 - dec + change)[None].to(out.dtype)
        handles.append(outer.register_forward_hook(hook))

    def scale(block, args, kwargs):
        x = (args[0] if args else kwargs["hidden_states"]).clone()
        for kind, rest, how in parsed:
            if kind == "t":
                x[:, where(rest[0])] *= how[1]
        return ((x, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": x})
    handles.append(blocks[0].register_forward_pre_hook(scale, with_kwargs=True))
    try:
        return hf(input_ids=ids).logits[0]
    finally:
        for h in handles:
            h.remove()
