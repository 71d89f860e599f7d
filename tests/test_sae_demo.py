"""SAELens folders (cfg.json + sae_weights.safetensors) loaded locally, and the demo SAE that
ships with the package."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import ipy_intervene as ii
from ipy_intervene.errors import InputError
from ipy_intervene.features.saelens import load_sae, save_sae


def write_folder(path, cfg, tensors):
    path.mkdir()
    (path / "cfg.json").write_text(json.dumps(cfg))
    save_file(tensors, str(path / "sae_weights.safetensors"))
    return path


def weights(d_in=8, d_sae=16, seed=0, **extra):
    gen = torch.Generator().manual_seed(seed)
    out = {"W_enc": torch.randn(d_in, d_sae, generator=gen),
           "b_enc": torch.randn(d_sae, generator=gen),
           "W_dec": torch.randn(d_sae, d_in, generator=gen),
           "b_dec": torch.randn(d_in, generator=gen)}
    out.update(extra)
    return out


def test_a_saelens_folder_loads_and_encodes_as_written(tmp_path):
    w = weights()
    folder = write_folder(tmp_path / "std", {"architecture": "standard", "d_in": 8, "d_sae": 16,
                                             "dtype": "float32", "apply_b_dec_to_input": True,
                                             "normalize_activations": "none",
                                             "metadata": {"hook_name": "blocks.2.hook_resid_post"}},
                          w)
    sae = load_sae(folder)
    x = torch.randn(3, 5, 8)
    assert torch.equal(sae.encode(x), torch.relu((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]))
    lat = torch.rand(3, 5, 16)
    assert torch.equal(sae.decode(lat), lat @ w["W_dec"] + w["b_dec"])
    assert sae.cfg["metadata"]["hook_name"] == "blocks.2.hook_resid_post"


def test_jumprelu_and_topk_folders(tmp_path):
    theta = torch.rand(16)
    w = weights(threshold=theta)
    jump = load_sae(write_folder(tmp_path / "jump", {"architecture": "jumprelu", "d_in": 8,
                                                    "d_sae": 16, "apply_b_dec_to_input": False}, w))
    x = torch.randn(4, 8)
    pre = x @ w["W_enc"] + w["b_enc"]
    assert torch.equal(jump.encode(x), torch.relu(pre) * (pre > theta))
    top = load_sae(write_folder(tmp_path / "top", {"activation_fn_str": "topk", "d_in": 8,
                                                  "d_sae": 16, "activation_fn_kwargs": {"k": 3}},
                                weights()))
    acts = top.encode(torch.randn(6, 8))
    assert int((acts > 0).sum(-1).max()) <= 3 and top.k == 3


def test_save_and_load_round_trip(tmp_path):
    sae = ii.SAE(8, 16, activation="topk", k=2)
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_()
    back = load_sae(save_sae(sae, tmp_path / "copy", hook_name="transformer.h[1]"))
    assert back.activation == "topk" and back.k == 2
    for name, value in sae.state_dict().items():
        assert torch.equal(back.state_dict()[name], value)
    assert back.cfg["metadata"] == {"hook_name": "transformer.h[1]"}


def test_bad_folders_say_what_is_wrong(tmp_path):
    with pytest.raises(InputError, match="nothing is downloaded"):
        load_sae("jbloom/gpt2-small-res-jb")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no cfg.json and no sae_weights.safetensors"):
        load_sae(tmp_path / "empty")
    cfg = {"architecture": "standard", "d_in": 8, "d_sae": 16}
    with pytest.raises(InputError, match="W_enc has shape"):
        load_sae(write_folder(tmp_path / "shape", cfg, weights(d_sae=12)))
    with pytest.raises(InputError, match="lacks threshold"):
        load_sae(write_folder(tmp_path / "nothr", {**cfg, "architecture": "jumprelu"}, weights()))
    with pytest.raises(InputError, match="gated"):
        load_sae(write_folder(tmp_path / "gated", {**cfg, "architecture": "gated"}, weights()))
    with pytest.raises(InputError, match="normalize_activations"):
        load_sae(write_folder(tmp_path / "norm", {**cfg, "normalize_activations": "layer_norm"},
                              weights()))


def test_the_demo_sae_ships_and_loads():
    sae = ii.load_sae("demo")
    assert (sae.d_in, sae.d_sae, sae.activation) == (128, 512, "relu")
    assert sae.cfg["metadata"]["hook_name"] == "transformer.h[2]"
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(512), atol=1e-5)


def test_the_demo_sae_reconstructs_sparsely_and_keeps_ioi(demo):
    from ipy_intervene.demo.sae_train import quality

    q = quality(ii.load_sae("demo"), demo.module, demo.tokenizer)
    assert q.fvu < 0.15 and 1 < q.l0 < 30 and q.dead < 256
    assert q.ioi_logit_diff_kept == q.ioi_logit_diff  # error kept: the forward is unchanged
    assert q.ioi_logit_diff > 5 and abs(q.ioi_logit_diff_dropped / q.ioi_logit_diff - 1) < 0.25


def test_training_is_seeded_and_reproducible(demo):
    from ipy_intervene.demo.sae_train import activations, train

    from tests.conftest import hook_count

    before = hook_count(demo.module)
    torch.set_num_threads(1)
    try:
        acts = activations(demo.module, demo.tokenizer, 64, seed=0)
        assert hook_count(demo.module) == before  # no hook left (output_hidden_states leaves some)
        a, b = train(acts, d_sae=64, steps=30, seed=0), train(acts, d_sae=64, steps=30, seed=0)
        c = train(acts, d_sae=64, steps=30, seed=1)
    finally:
        torch.set_num_threads(_THREADS)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.W_enc, c.W_enc)
    assert acts.shape[1] == 128 and len(acts) > 64


_THREADS = torch.get_num_threads()
