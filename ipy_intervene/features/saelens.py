"""SAELens's on-disk format, read and written locally: a folder with ``cfg.json`` and
``sae_weights.safetensors`` (``W_enc [d_in, d_sae]``, ``b_enc``, ``W_dec [d_sae, d_in]``,
``b_dec``, and ``threshold`` for JumpReLU). Nothing is downloaded.

>>> sae = ii.load_sae("demo")                       # the SAE shipped with the demo model
>>> sae = ii.load_sae("/path/to/saelens/folder")    # doctest: +SKIP
>>> save_sae(sae, tmp_path / "copy")                # doctest: +SKIP

The loader never guesses: a folder loads with exactly the arithmetic its ``cfg.json`` asks
for, or is refused with an error naming the key. Every top-level key of ``cfg.json`` is one
of three kinds (SAELens's own fields, from its pre-6.0 flat configs to the 6.x ones):

* ``ARITHMETIC``: what encode/decode compute; each is read and checked here, and a value
  this package does not implement (``normalize_activations="layer_norm"``,
  ``rescale_acts_by_decoder_norm=True``...) is refused;
* ``METADATA``: where and on what the SAE was trained (``model_name``, ``hook_name``...);
* ``TRAINING``: losses, optimiser, initialisation, data pipeline and logging, which shape the
  weights but not how trained weights are applied.

Any other key may change the arithmetic (a newer SAELens field, another library's), so it is
refused too, unless ``ignore_keys=[...]`` says it is known not to.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch

from ipy_intervene.errors import InputError
from ipy_intervene.features.sae import SAE

CFG, WEIGHTS = "cfg.json", "sae_weights.safetensors"
DEMO_SAE = Path(__file__).resolve().parent.parent / "demo" / "sae"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float64": torch.float64}

# SAELens architectures: the activation each one computes, and whether it is a transcoder
# (reads one site, writes another: ``b_dec`` is never subtracted from its input).
ARCHITECTURES = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu",
                 "transcoder": "relu", "jumprelu_transcoder": "jumprelu"}
TRANSCODERS = ("transcoder", "jumprelu_transcoder")
# the activation functions an ``activation_fn_str`` may name, per architecture
ACTIVATION_FNS = {"standard": ("relu", "topk"), "topk": ("topk",), "jumprelu": ("relu",),
                  "transcoder": ("relu",), "jumprelu_transcoder": ("relu",)}
HEAD_KEYS = ("hook_head_index", "hook_point_head_index", "hook_head_index_out")

ARITHMETIC = frozenset({
    "architecture", "d_in", "d_sae", "d_out", "dtype", "activation_fn_str", "activation_fn",
    "activation_fn_kwargs", "k", "apply_b_dec_to_input", "normalize_activations",
    "rescale_acts_by_decoder_norm", "finetuning_scaling_factor", "reshape_activations",
    *HEAD_KEYS})
METADATA = frozenset({
    "metadata", "meta", "model_name", "model_class_name", "model_from_pretrained_kwargs",
    "model_kwargs", "hook_name", "hook_point", "hook_layer", "hook_point_layer",
    "hook_name_out", "hook_layer_out", "hook_eval", "hook_point_eval", "prepend_bos",
    "exclude_special_tokens", "neuronpedia_id", "context_size", "seqpos_slice",
    "dataset_path", "dataset_trust_remote_code", "is_dataset_tokenized", "streaming",
    "sequence_separator_token", "disable_concat_sequences", "sae_lens_version",
    "sae_lens_training_version", "device", "expansion_factor", "run_name"})
TRAINING = frozenset({
    # losses and their schedules
    "l1_coefficient", "l1_warm_up_steps", "lp_norm", "l0_coefficient", "l0_warm_up_steps",
    "jumprelu_bandwidth", "jumprelu_init_threshold", "jumprelu_sparsity_loss_mode",
    "jumprelu_tanh_scale", "pre_act_loss_coefficient", "aux_loss_coefficient",
    "topk_threshold_lr", "matryoshka_widths", "mse_loss_normalization", "noise_scale",
    "scale_sparsity_penalty_by_decoder_norm", "use_ghost_grads", "normalize_sae_decoder",
    "use_sparse_activations",  # a sparse tensor of the same values while training
    # initialisation
    "b_dec_init_method", "decoder_init_norm", "decoder_heuristic_init",
    "decoder_heuristic_init_norm", "decoder_orthogonal_init",
    "init_encoder_as_decoder_transpose", "from_pretrained_path", "finetuning_method",
    "finetuning_tokens",
    # optimiser and schedule
    "lr", "lr_decay_steps", "lr_end", "lr_scheduler_name", "lr_warm_up_steps",
    "n_restart_cycles", "adam_beta1", "adam_beta2", "seed",
    # activation store, batches and compute
    "act_store_device", "cached_activations_path", "new_cached_activations_path",
    "use_cached_activations", "n_batches_in_buffer", "store_batch_size",
    "store_batch_size_prompts", "train_batch_size", "train_batch_size_tokens",
    "training_tokens", "total_training_tokens", "tokens_per_buffer", "autocast",
    "autocast_lm", "compile_llm", "compile_sae", "llm_compilation_mode",
    "sae_compilation_mode",
    # dead features, evaluation, checkpoints and logging
    "dead_feature_threshold", "dead_feature_window", "feature_sampling_window",
    "eval_batch_size_prompts", "eval_every_n_wandb_logs", "n_eval_batches", "n_eval_seqs",
    "checkpoint_path", "n_checkpoints", "save_final_checkpoint", "output_path", "resume",
    "resume_from_checkpoint", "log_to_wandb", "log_activations_store_to_wandb",
    "log_optimizer_state_to_wandb", "logger", "wandb_entity", "wandb_id",
    "wandb_log_frequency", "wandb_project", "verbose"})


@dataclass(frozen=True)
class _Spec:
    """What ``cfg.json`` asks for, checked: the arguments of :class:`SAE`."""

    architecture: str
    activation: str
    k: int | None
    apply_b_dec_to_input: bool
    d_out: int | None
    dtype: torch.dtype


def load_sae(where: str | Path, *, device: str | torch.device | None = None,
             ignore_keys: Iterable[str] = ()) -> SAE:
    """An SAE from a local SAELens folder (``"demo"``: the one shipped with the demo model).

    Architectures ``standard`` (ReLU, or top-k when ``activation_fn_str`` is ``"topk"``),
    ``topk``, ``jumprelu`` (``threshold``, or ``log_threshold`` in the weights), and the
    transcoders ``transcoder`` and ``jumprelu_transcoder``. A folder whose ``cfg.json`` asks
    for anything else (another architecture or activation function, input normalisation,
    decoder-norm rescaling, a per-latent scaling factor, one attention head...) is refused
    with an error naming the key; so is a key this loader does not know, unless
    ``ignore_keys`` lists it (you vouch that it does not change the arithmetic). The folder's
    ``cfg.json`` is kept as ``sae.cfg``.

    >>> sae = ii.load_sae("folder", ignore_keys=["my_note"])     # doctest: +SKIP
    """
    ignore = _ignore_keys(ignore_keys)
    folder = DEMO_SAE if str(where) == "demo" else Path(where).expanduser()
    if not folder.is_dir():
        raise InputError(f"no SAE folder at {str(where)!r}: load_sae reads a local folder with "
                         f"{CFG} and {WEIGHTS} (SAELens's format), or 'demo'; nothing is "
                         "downloaded")
    missing = [name for name in (CFG, WEIGHTS) if not (folder / name).is_file()]
    if missing:
        raise InputError(f"{folder} has no {' and no '.join(missing)}: an SAELens folder holds "
                         f"{CFG} and {WEIGHTS}")
    cfg = _read_cfg(folder / CFG)
    spec = _spec(cfg, folder / CFG, ignore)
    sae = SAE(cfg["d_in"], cfg["d_sae"], activation=spec.activation, k=spec.k,
              dtype=spec.dtype, apply_b_dec_to_input=spec.apply_b_dec_to_input,
              d_out=spec.d_out)
    _load_weights(sae, folder / WEIGHTS, spec)
    sae.cfg = cfg
    return sae.to(device) if device is not None else sae


def save_sae(sae: SAE, folder: str | Path, **meta: Any) -> Path:
    """Write ``sae`` as an SAELens folder (``meta``: e.g. ``hook_name``, ``model_name``).

    >>> save_sae(sae, "my_sae", hook_name="transformer.h[2]")   # doctest: +SKIP
    PosixPath('my_sae')
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arch = {"relu": "standard"}.get(sae.activation, sae.activation)
    if not sae.apply_b_dec_to_input and sae.activation in ("relu", "jumprelu"):
        arch = {"relu": "transcoder", "jumprelu": "jumprelu_transcoder"}[sae.activation]
    dtype = next(k for k, v in DTYPES.items() if v == sae.W_enc.dtype)
    cfg = {"architecture": arch, "d_in": sae.d_in, "d_sae": sae.d_sae, "dtype": dtype,
           "apply_b_dec_to_input": sae.apply_b_dec_to_input, "normalize_activations": "none",
           "metadata": dict(meta)}
    if sae.activation == "topk":
        cfg["k"] = sae.k
    if sae.d_out != sae.d_in or arch in TRANSCODERS:
        cfg["d_out"] = sae.d_out
    state = {k: v.detach().contiguous().cpu() for k, v in sae.state_dict().items()}
    save_file(state, str(folder / WEIGHTS))
    (folder / CFG).write_text(json.dumps(cfg, indent=2) + "\n")
    return folder


def _ignore_keys(keys: Iterable[str]) -> frozenset[str]:
    if isinstance(keys, str):
        keys = [keys]
    keys = list(keys)
    bad = [k for k in keys if not isinstance(k, str)]
    if bad:
        raise InputError(f"ignore_keys lists cfg.json keys (strings); got {bad[0]!r}")
    known = sorted(set(keys) & ARITHMETIC)
    if known:
        raise InputError(f"ignore_keys={known}: {', '.join(f'`{k}`' for k in known)} changes "
                         "what the SAE computes and is always checked; ignore_keys is for "
                         "keys this loader does not know")
    return frozenset(keys)


def _read_cfg(path: Path) -> dict[str, Any]:
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{path} is not readable JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise InputError(f"{path} holds {type(cfg).__name__}, not a JSON object")
    for key in ("d_in", "d_sae"):
        if not _is_int(cfg.get(key)) or cfg[key] < 1:
            raise InputError(f"{path}: `{key}` is missing or not a positive int "
                             f"({cfg.get(key)!r})")
    return cfg


def _spec(cfg: dict[str, Any], path: Path, ignore: frozenset[str]) -> _Spec:
    """Check every key of ``cfg`` and return what to build, or raise naming the key."""
    arch = _architecture(cfg, path)
    unknown = sorted(set(cfg) - ARITHMETIC - METADATA - TRAINING - ignore)
    if unknown:
        names = ", ".join(f"`{k}`={_short(cfg[k])}" for k in unknown)
        raise InputError(f"{path}: {names}: not a key this loader knows, and it may change "
                         "what the SAE computes, so the folder is not loaded. If it does "
                         f"not (a note, a training setting), pass ignore_keys={unknown!r}")
    activation = _activation(cfg, path, arch)
    k = _k(cfg, path, activation)
    _refuse_unimplemented(cfg, path)
    d_out = cfg.get("d_out")
    if d_out is not None and (not _is_int(d_out) or d_out < 1):
        raise InputError(f"{path}: `d_out`={d_out!r} is not a positive int")
    if arch in TRANSCODERS and d_out is None:
        raise InputError(f"{path}: `architecture`={arch!r} needs `d_out` (the output width)")
    apply_b_dec = cfg.get("apply_b_dec_to_input", arch not in TRANSCODERS)
    if not isinstance(apply_b_dec, bool):
        raise InputError(f"{path}: `apply_b_dec_to_input`={apply_b_dec!r} is not true or "
                         "false")
    if apply_b_dec and arch in TRANSCODERS:
        raise InputError(f"{path}: `apply_b_dec_to_input`=True with `architecture`={arch!r}: "
                         "a transcoder never subtracts b_dec (width d_out) from its input; "
                         "supported: false")
    if apply_b_dec and d_out is not None and d_out != cfg["d_in"]:
        raise InputError(f"{path}: `apply_b_dec_to_input`=True with `d_out`={d_out} != "
                         f"`d_in`={cfg['d_in']}: b_dec cannot be subtracted from the input; "
                         "supported: false")
    dtype_name = str(cfg.get("dtype", "float32")).removeprefix("torch.")
    if dtype_name not in DTYPES:
        raise InputError(f"{path}: `dtype`={cfg.get('dtype')!r} is not one of "
                         f"{', '.join(DTYPES)}")
    return _Spec(arch, activation, k, apply_b_dec, d_out, DTYPES[dtype_name])


def _architecture(cfg: dict[str, Any], path: Path) -> str:
    arch = cfg.get("architecture", "standard")  # SAELens before 0.4: no key, a ReLU SAE
    if arch not in ARCHITECTURES:
        raise InputError(f"{path}: `architecture`={arch!r} is not implemented; supported: "
                         f"{', '.join(ARCHITECTURES)}")
    return arch


def _activation(cfg: dict[str, Any], path: Path, arch: str) -> str:
    """The activation: the architecture's, or (``standard``) the one ``activation_fn_str``
    names (SAELens before 6.0 wrote top-k SAEs as ``standard`` + ``"topk"``)."""
    named = {key: cfg[key] for key in ("activation_fn_str", "activation_fn")
             if cfg.get(key) is not None}
    if len(set(map(repr, named.values()))) > 1:
        raise InputError(f"{path}: `activation_fn_str`={named['activation_fn_str']!r} and "
                         f"`activation_fn`={named['activation_fn']!r} disagree")
    allowed = ACTIVATION_FNS[arch]
    for key, fn in named.items():
        if fn not in allowed:
            raise InputError(f"{path}: `{key}`={fn!r} is not implemented for `architecture`="
                             f"{arch!r}; supported: {', '.join(map(repr, allowed))}")
    fn = next(iter(named.values()), allowed[0])
    return "topk" if fn == "topk" else ARCHITECTURES[arch]


def _k(cfg: dict[str, Any], path: Path, activation: str) -> int | None:
    """``k`` of a top-k SAE: top-level (``topk`` architecture, SAELens 6) or in
    ``activation_fn_kwargs`` (``activation_fn_str="topk"``, before 6.0); both must agree."""
    kwargs = cfg.get("activation_fn_kwargs")
    if kwargs is None:
        kwargs = {}
    if not isinstance(kwargs, dict):
        raise InputError(f"{path}: `activation_fn_kwargs`={kwargs!r} is not a JSON object")
    allowed = ("k",) if activation == "topk" else ()
    extra = sorted(set(kwargs) - set(allowed))
    if extra:
        supported = "only k" if allowed else "none (an empty object)"
        raise InputError(f"{path}: `activation_fn_kwargs`={kwargs!r}: {', '.join(extra)} is "
                         f"not implemented for a {activation} SAE; supported: {supported}")
    found = {key: value for key, value in (("k", cfg.get("k")),
                                           ("activation_fn_kwargs.k", kwargs.get("k")))
             if value is not None}
    if activation != "topk":
        if found:
            key, value = next(iter(found.items()))
            raise InputError(f"{path}: `{key}`={value!r} is set but the SAE is {activation}, "
                             "not top-k; supported: no k")
        return None
    if not found:
        raise InputError(f"{path}: a top-k SAE needs `k` (or `activation_fn_kwargs.k`); "
                         "cfg.json has neither")
    if len(set(found.values())) > 1:
        raise InputError(f"{path}: `k`={found['k']!r} and `activation_fn_kwargs.k`="
                         f"{found['activation_fn_kwargs.k']!r} disagree")
    key, k = next(iter(found.items()))
    if isinstance(k, float) and k.is_integer():
        k = int(k)
    if not _is_int(k) or not 0 < k <= cfg["d_sae"]:
        raise InputError(f"{path}: `{key}`={k!r}: supported: an integer from 1 to d_sae="
                         f"{cfg['d_sae']}")
    return k


def _refuse_unimplemented(cfg: dict[str, Any], path: Path) -> None:
    """The keys whose only implemented value is the plain one."""
    norm = cfg.get("normalize_activations")
    if norm not in (None, "none", False):
        raise InputError(f"{path}: `normalize_activations`={norm!r} is not implemented; "
                         "supported: 'none'. Fold the scaling into the weights (SAELens: "
                         "fold_activation_norm_scaling_factor) and save with "
                         "normalize_activations='none'")
    for key, why in (("rescale_acts_by_decoder_norm", "latents scaled by the decoder's row "
                      "norms before top-k and unscaled before decoding"),
                     ("finetuning_scaling_factor", "latents scaled by a per-latent factor "
                      "before decoding")):
        if cfg.get(key) not in (None, False):
            raise InputError(f"{path}: `{key}`={cfg[key]!r} ({why}) is not implemented; "
                             "supported: false")
    reshape = cfg.get("reshape_activations")
    if reshape not in (None, "none"):
        raise InputError(f"{path}: `reshape_activations`={reshape!r} (an SAE on attention "
                         "heads' z, read as [..., n_heads, d_head]) is not implemented; "
                         "supported: 'none'")
    if "reshape_activations" not in cfg:  # before 6.0 a hook_z name turned the reshape on
        for key in ("hook_name", "hook_point"):
            name = cfg.get(key)
            if isinstance(name, str) and ("hook_z" in name or name.endswith("_z")):
                raise InputError(f"{path}: `{key}`={name!r}: SAELens reshapes a hook_z SAE's "
                                 "input ([..., n_heads, d_head]), which is not implemented; "
                                 "supported: an SAE on a module's output, no hook_z")
    for where, holder in (("", cfg), *((f"{m}.", cfg[m]) for m in ("metadata", "meta")
                                        if isinstance(cfg.get(m), dict))):
        for key in HEAD_KEYS:
            if holder.get(key) is not None:
                raise InputError(f"{path}: `{where}{key}`={holder[key]!r}: an SAE on one "
                                 "attention head's slice is not implemented; supported: null")
    for key in ("metadata", "meta"):
        if cfg.get(key) is not None and not isinstance(cfg[key], dict):
            raise InputError(f"{path}: `{key}`={cfg[key]!r} is not a JSON object")


def _load_weights(sae: SAE, path: Path, spec: _Spec) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise InputError(f"{path} is not a readable safetensors file ({exc})") from None
    expected = sae.state_dict()
    if "log_threshold" in state and spec.activation == "jumprelu":
        if "threshold" in state:
            raise InputError(f"{path} holds both threshold and log_threshold: which one "
                             "the SAE uses is ambiguous")
        state["threshold"] = state.pop("log_threshold").exp()  # as SAELens reads it
    scale = state.get("scaling_factor")
    if scale is not None and bool((scale == 1).all()):
        del state["scaling_factor"]  # all ones (SAELens 3-5 wrote it so): f * 1 == f
    if "scaling_factor" in state:
        raise InputError(f"{path} holds scaling_factor (a per-latent factor on the latents "
                         "before decoding, not all ones): not implemented")
    missing = sorted(set(expected) - set(state))
    if missing:
        raise InputError(f"{path} lacks {', '.join(missing)} for a {spec.architecture} SAE")
    extra = sorted(set(state) - set(expected))
    if extra:
        raise InputError(f"{path} holds {', '.join(extra)}, which a {spec.architecture} "
                         f"{spec.activation} SAE does not use (it reads "
                         f"{', '.join(expected)}): not loaded, rather than dropped")
    for name, want in expected.items():
        if tuple(state[name].shape) != tuple(want.shape):
            raise InputError(f"{path}: {name} has shape {list(state[name].shape)}; cfg.json "
                             f"(d_in={sae.d_in}, d_sae={sae.d_sae}) needs {list(want.shape)}")
    sae.load_state_dict({k: state[k].to(want.dtype) for k, want in expected.items()})


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."
