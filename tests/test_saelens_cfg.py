"""load_sae never guesses (issue 27): an SAELens folder loads with exactly the arithmetic its
cfg.json asks for, checked here against the formulas written by hand in plain torch, or it is
refused with an InputError naming the key."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from ipy_intervene.errors import InputError, InterventionError
from ipy_intervene.features.saelens import load_sae

D_IN, D_SAE, D_OUT = 8, 32, 6

# what SAELens before 6.0 wrote: one flat dict, training settings included
OLD_STANDARD = {"model_name": "gpt2-small", "hook_point": "blocks.2.hook_resid_pre",
                "hook_point_layer": 2, "hook_point_head_index": None,
                "dataset_path": "Skylion007/openwebtext", "is_dataset_tokenized": False,
                "context_size": 128, "d_in": D_IN, "d_sae": D_SAE, "expansion_factor": 4,
                "dtype": "torch.float32", "device": "cuda", "seed": 42,
                "b_dec_init_method": "geometric_median", "l1_coefficient": 8e-05, "lr": 4e-4,
                "lr_scheduler_name": "constantwithwarmup", "lr_warm_up_steps": 5000,
                "train_batch_size": 4096, "use_ghost_grads": False, "log_to_wandb": True,
                "wandb_project": "mats", "checkpoint_path": "checkpoints/x",
                "tokens_per_buffer": 67108864, "run_name": "32-L1-8e-05",
                "architecture": "standard", "activation_fn_str": "relu",
                "activation_fn_kwargs": {}, "apply_b_dec_to_input": True,
                "finetuning_scaling_factor": False, "normalize_activations": "none",
                "sae_lens_training_version": "3.5.0", "prepend_bos": True}
# what SAELens 6 writes: the SAE's own fields, the rest under metadata
NEW_TOPK = {"architecture": "topk", "d_in": D_IN, "d_sae": D_SAE, "dtype": "float32",
            "device": "cpu", "apply_b_dec_to_input": True, "normalize_activations": "none",
            "reshape_activations": "none", "k": 4, "rescale_acts_by_decoder_norm": False,
            "metadata": {"model_name": "gpt2", "hook_name": "blocks.3.hook_resid_post",
                         "hook_head_index": None, "sae_lens_version": "6.5.0",
                         "sae_lens_training_version": "6.5.0"}}


def write(path, cfg, tensors):
    path.mkdir()
    (path / "cfg.json").write_text(json.dumps(cfg))
    save_file(tensors, str(path / "sae_weights.safetensors"))
    return path


def weights(seed=0, d_out=D_IN, **extra):
    gen = torch.Generator().manual_seed(seed)
    out = {"W_enc": torch.randn(D_IN, D_SAE, generator=gen),
           "b_enc": torch.randn(D_SAE, generator=gen),
           "W_dec": torch.randn(D_SAE, d_out, generator=gen),
           "b_dec": torch.randn(d_out, generator=gen)}
    out.update(extra)
    return out


def inputs(seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(3, 7, D_IN, generator=gen), torch.rand(3, 7, D_SAE, generator=gen)


def topk_by_hand(pre, k):
    """SAELens's TopK: the k largest pre-activations, ReLU'd, zeros elsewhere."""
    values, indices = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, indices, values.relu())


def check_decode(sae, w, lat):
    assert torch.equal(sae.decode(lat), lat @ w["W_dec"] + w["b_dec"])


# --- folders that load: encode and decode against the formulas by hand ------------------

@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_old_standard_relu_folder(tmp_path, apply_b_dec):
    w = weights()
    sae = load_sae(write(tmp_path / "old", {**OLD_STANDARD, "apply_b_dec_to_input": apply_b_dec},
                         w))
    x, lat = inputs()
    centred = x - w["b_dec"] if apply_b_dec else x
    assert sae.activation == "relu" and sae.apply_b_dec_to_input is apply_b_dec
    assert torch.equal(sae.encode(x), torch.relu(centred @ w["W_enc"] + w["b_enc"]))
    check_decode(sae, w, lat)
    check_decode(sae, w, sae.encode(x))


def test_a_cfg_without_architecture_or_apply_b_dec_reads_saelens_defaults(tmp_path):
    w = weights()
    sae = load_sae(write(tmp_path / "bare", {"d_in": D_IN, "d_sae": D_SAE}, w))
    x, _ = inputs()
    assert torch.equal(sae.encode(x), torch.relu((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]))


@pytest.mark.parametrize("where", ["activation_fn_kwargs", "top-level", "both"])
def test_standard_with_topk_activation_is_top_k(tmp_path, where):
    """The issue: standard + activation_fn_str topk loaded as ReLU (56-64 latents a token)."""
    cfg = {**OLD_STANDARD, "activation_fn_str": "topk", "activation_fn_kwargs": {}}
    if where in ("activation_fn_kwargs", "both"):
        cfg["activation_fn_kwargs"] = {"k": 4}
    if where in ("top-level", "both"):
        cfg["k"] = 4
    w = weights()
    sae = load_sae(write(tmp_path / "top", cfg, w))
    x, lat = inputs()
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    acts = sae.encode(x)
    assert (sae.activation, sae.k) == ("topk", 4)
    assert torch.equal(acts, topk_by_hand(pre, 4))
    assert ((acts != 0).sum(-1) == 4).all()
    assert int((torch.relu(pre) > 0).sum(-1).min()) > 4  # ReLU alone would keep more
    check_decode(sae, w, lat)


def test_topk_architecture_with_k(tmp_path):
    w = weights(seed=3)
    sae = load_sae(write(tmp_path / "topk", NEW_TOPK, w))
    x, lat = inputs(seed=4)
    acts = sae.encode(x)
    assert torch.equal(acts, topk_by_hand((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"], 4))
    assert ((acts != 0).sum(-1) == 4).all()
    check_decode(sae, w, lat)
    assert sae.cfg["metadata"]["hook_name"] == "blocks.3.hook_resid_post"


@pytest.mark.parametrize("stored", ["threshold", "log_threshold"])
def test_jumprelu_with_threshold_or_log_threshold(tmp_path, stored):
    gen = torch.Generator().manual_seed(5)
    if stored == "threshold":
        theta = torch.rand(D_SAE, generator=gen) * 2
        theta[:3] = -0.5  # negative: SAELens clamps the threshold at 0, the ReLU does the same
        w = weights(threshold=theta)
    else:
        w = weights(log_threshold=torch.randn(D_SAE, generator=gen))
        theta = w["log_threshold"].exp()  # what SAELens computes from the stored log
    cfg = {"architecture": "jumprelu", "d_in": D_IN, "d_sae": D_SAE, "dtype": "float32",
           "apply_b_dec_to_input": False, "normalize_activations": None,
           "activation_fn": "relu", "metadata": {"hook_name": "blocks.1.hook_resid_post"}}
    sae = load_sae(write(tmp_path / "jump", cfg, w))
    x, lat = inputs()
    pre = x @ w["W_enc"] + w["b_enc"]
    assert torch.equal(sae.threshold.detach(), theta)
    assert torch.equal(sae.encode(x), torch.relu(pre) * (pre > theta.relu()))
    check_decode(sae, w, lat)


@pytest.mark.parametrize("arch", ["transcoder", "jumprelu_transcoder"])
def test_transcoder_folders(tmp_path, arch):
    """A transcoder (kind='transcoder' splices it) never subtracts b_dec from its input."""
    theta = torch.rand(D_SAE)
    extra = {"threshold": theta} if arch == "jumprelu_transcoder" else {}
    w = weights(d_out=D_OUT, **extra)
    cfg = {"architecture": arch, "d_in": D_IN, "d_sae": D_SAE, "d_out": D_OUT,
           "dtype": "float32", "apply_b_dec_to_input": False, "normalize_activations": "none",
           "reshape_activations": "none",
           "metadata": {"hook_name": "blocks.0.ln2.hook_normalized",
                        "hook_name_out": "blocks.0.hook_mlp_out"}}
    sae = load_sae(write(tmp_path / arch, cfg, w))
    x, lat = inputs()
    pre = x @ w["W_enc"] + w["b_enc"]
    by_hand = torch.relu(pre) * (pre > theta) if extra else torch.relu(pre)
    assert sae.d_out == D_OUT and not sae.apply_b_dec_to_input
    assert torch.equal(sae.encode(x), by_hand)
    check_decode(sae, w, lat)


def test_an_all_ones_scaling_factor_is_the_identity_and_loads(tmp_path):
    """SAELens 3-5 saved scaling_factor = 1 with every SAE; f * 1 == f exactly."""
    w = weights()
    sae = load_sae(write(tmp_path / "ones", OLD_STANDARD,
                         {**w, "scaling_factor": torch.ones(D_SAE)}))
    x, _ = inputs()
    assert torch.equal(sae.encode(x), torch.relu((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]))
    assert "scaling_factor" not in sae.state_dict()


def test_ignore_keys_vouches_for_an_unknown_key(tmp_path):
    cfg = {**NEW_TOPK, "my_lab_note": "trained on Tuesday"}
    folder = write(tmp_path / "note", cfg, weights())
    with pytest.raises(InputError, match=r"`my_lab_note`='trained on Tuesday'.*"
                                         r"ignore_keys=\['my_lab_note'\]"):
        load_sae(folder)
    assert load_sae(folder, ignore_keys=["my_lab_note"]).k == 4
    with pytest.raises(InputError, match="`normalize_activations` changes what the SAE"):
        load_sae(folder, ignore_keys=["my_lab_note", "normalize_activations"])


# --- folders that are refused, the message naming the key --------------------------------

THETA = {"threshold": torch.full((D_SAE,), 0.1)}
REFUSED = {
    # activation functions and architectures not implemented
    "tanh-relu": ({"activation_fn_str": "tanh-relu"}, {}, "`activation_fn_str`='tanh-relu'"),
    "gelu": ({"activation_fn": "gelu"}, {}, "`activation_fn`='gelu'"),
    "fn-disagree": ({"activation_fn_str": "relu", "activation_fn": "topk"}, {},
                    "`activation_fn_str`='relu' and `activation_fn`='topk' disagree"),
    "gated": ({"architecture": "gated"}, {"b_gate": torch.zeros(D_SAE)},
              "`architecture`='gated'"),
    "batchtopk": ({"architecture": "batchtopk", "k": 4}, {}, "`architecture`='batchtopk'"),
    "matryoshka": ({"architecture": "matryoshka_batchtopk"}, {}, "`architecture`="),
    "skip-transcoder": ({"architecture": "skip_transcoder", "apply_b_dec_to_input": False},
                        {}, "`architecture`='skip_transcoder'"),
    "null-architecture": ({"architecture": None}, {}, "`architecture`=None"),
    "topk-arch-relu-fn": ({"architecture": "topk", "k": 4}, {},
                          "`activation_fn_str`='relu' is not implemented for `architecture`="
                          "'topk'"),
    "jumprelu-topk-fn": ({"architecture": "jumprelu", "activation_fn_str": "topk",
                          "activation_fn_kwargs": {"k": 4}}, THETA, "`activation_fn_str`="),
    # k
    "topk-without-k": ({"activation_fn_str": "topk"}, {}, "needs `k`"),
    "k-disagrees": ({"activation_fn_str": "topk", "activation_fn_kwargs": {"k": 4}, "k": 5},
                    {}, "`k`=5 and `activation_fn_kwargs.k`=4 disagree"),
    "k-too-large": ({"architecture": "topk", "activation_fn_str": None, "k": D_SAE + 1}, {},
                    f"`k`={D_SAE + 1}"),
    "k-not-int": ({"architecture": "topk", "activation_fn_str": None, "k": "4"}, {},
                  "`k`='4'"),
    "k-on-relu": ({"k": 4}, {}, "`k`=4 is set but the SAE is relu"),
    "kwargs-on-relu": ({"activation_fn_kwargs": {"k": 4}}, {},
                       "`activation_fn_kwargs`={'k': 4}: k is not implemented for a relu"),
    "kwargs-extra": ({"activation_fn_str": "topk", "activation_fn_kwargs": {"k": 4,
                                                                           "postact": "gelu"}},
                     {}, "`activation_fn_kwargs`="),
    # arithmetic flags with a value not implemented
    "rescale-by-decoder-norm": ({"architecture": "topk", "activation_fn_str": None, "k": 4,
                                 "rescale_acts_by_decoder_norm": True}, {},
                                "`rescale_acts_by_decoder_norm`=True"),
    "finetuning-scaling-factor": ({"finetuning_scaling_factor": True}, {},
                                  "`finetuning_scaling_factor`=True"),
    "scaling-factor-weights": ({}, {"scaling_factor": torch.linspace(0.5, 2, D_SAE)},
                               "scaling_factor"),
    "layer-norm": ({"normalize_activations": "layer_norm"}, {},
                   "`normalize_activations`='layer_norm'"),
    "expected-average": ({"normalize_activations": "expected_average_only_in"}, {},
                         "`normalize_activations`='expected_average_only_in'"),
    "constant-norm": ({"normalize_activations": "constant_norm_rescale"}, {},
                      "`normalize_activations`='constant_norm_rescale'"),
    "normalize-true": ({"normalize_activations": True}, {}, "`normalize_activations`=True"),
    "apply-b-dec-string": ({"apply_b_dec_to_input": "false"}, {},
                           "`apply_b_dec_to_input`='false'"),
    "transcoder-apply-b-dec": ({"architecture": "transcoder", "d_out": D_IN,
                                "apply_b_dec_to_input": True}, {},
                               "`apply_b_dec_to_input`=True with `architecture`='transcoder'"),
    "transcoder-without-d_out": ({"architecture": "transcoder", "apply_b_dec_to_input": False},
                                 {}, "needs `d_out`"),
    "d_out-apply-b-dec": ({"d_out": D_OUT}, {"W_dec": torch.zeros(D_SAE, D_OUT),
                                             "b_dec": torch.zeros(D_OUT)},
                          f"`apply_b_dec_to_input`=True with `d_out`={D_OUT}"),
    # one attention head, or heads' z
    "hook_head_index": ({"hook_head_index": 3}, {}, "`hook_head_index`=3"),
    "hook_point_head_index": ({"hook_point_head_index": 1}, {}, "`hook_point_head_index`=1"),
    "metadata-head": ({"metadata": {"hook_name": "blocks.1.attn.hook_z",
                                    "hook_head_index": 2}, "reshape_activations": "none"}, {},
                      "`metadata.hook_head_index`=2"),
    "reshape-hook_z": ({"reshape_activations": "hook_z"}, {},
                       "`reshape_activations`='hook_z'"),
    "old-hook_z-name": ({"hook_point": "blocks.1.attn.hook_z"}, {},
                        "`hook_point`='blocks.1.attn.hook_z'"),
    # keys this loader does not know
    "unknown-key": ({"decoder_scale": 2.0}, {}, "`decoder_scale`=2.0"),
    "runner-sae-dict": ({"sae": {"architecture": "topk", "k": 4}}, {}, "`sae`="),
    "metadata-not-dict": ({"metadata": "gpt2"}, {}, "`metadata`='gpt2'"),
    # weights that the cfg does not account for
    "extra-tensor": ({}, {"W_skip": torch.zeros(D_IN, D_IN)}, "W_skip"),
    "log_threshold-on-relu": ({}, {"log_threshold": torch.zeros(D_SAE)}, "log_threshold"),
    "both-thresholds": ({"architecture": "jumprelu"},
                        {**THETA, "log_threshold": torch.zeros(D_SAE)},
                        "both threshold and log_threshold"),
    "dtype": ({"dtype": "int8"}, {}, "`dtype`='int8'"),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_refused_with_the_key_named(tmp_path, name):
    change, extra, message = REFUSED[name]
    folder = write(tmp_path / name, {**OLD_STANDARD, **change}, {**weights(), **extra})
    with pytest.raises(InputError) as info:
        load_sae(folder)
    assert isinstance(info.value, InterventionError)
    assert message in str(info.value)
    assert "cfg.json" in str(info.value) or "sae_weights" in str(info.value)


def test_sae_refuses_a_bool_k():
    from ipy_intervene.features.sae import SAE

    with pytest.raises(InputError, match="k=True"):
        SAE(D_IN, D_SAE, activation="topk", k=True)


@pytest.mark.parametrize("activation,d_out", [("relu", None), ("relu", D_OUT),
                                              ("jumprelu", None), ("topk", D_OUT)])
def test_what_save_sae_writes_loads_back_exactly(tmp_path, activation, d_out):
    from ipy_intervene.features.saelens import save_sae
    from ipy_intervene.features.sae import SAE

    sae = SAE(D_IN, D_SAE, activation=activation, k=3 if activation == "topk" else None,
              d_out=d_out, apply_b_dec_to_input=d_out is None)
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_()
    back = load_sae(save_sae(sae, tmp_path / "copy", hook_name="transformer.h[1]"))
    x, lat = inputs()
    assert torch.equal(back.encode(x), sae.encode(x))
    assert torch.equal(back.decode(lat), sae.decode(lat))
