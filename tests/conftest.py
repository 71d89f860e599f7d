"""Shared fixtures: the demo model, tiny models of three architectures, a testing shell."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from IPython.core.interactiveshell import InteractiveShell
from transformers import (GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM,
                          LlamaConfig, LlamaForCausalLM)

import ipy_intervene as ii

PROMPT = "When Mary and John went to the store , John gave a drink to"
CORRUPT = "When Mary and John went to the store , Mary gave a drink to"
SHORT = "Then , Mary and John had"

ARCHS = ("gpt2", "neox", "llama")
LAYERS = {"gpt2": ("transformer", "h"), "neox": ("gpt_neox", "layers"), "llama": ("model", "layers")}
CLEAN2 = [PROMPT, PROMPT.replace("store", "park")]    # two prompts of the same length
CORRUPT2 = [CORRUPT, CORRUPT.replace("store", "park")]


def mary_john(model: ii.Model) -> tuple[int, int]:
    """The token ids of the IOI answers, as the examples take them."""
    return model.token_id("Mary"), model.token_id("John")
UNEMBED = {"gpt2": "lm_head", "neox": "lm_head", "llama": "lm_head"}
MLP = {"gpt2": "mlp", "neox": "mlp", "llama": "mlp"}


def tiny_model(arch: str, vocab: int) -> torch.nn.Module:
    """A 3-layer, 32-wide random model of the given architecture, seeded."""
    torch.manual_seed(0)
    special = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 1}
    if arch == "gpt2":
        cfg = GPT2Config(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=3, n_head=4,
                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **special)
        return GPT2LMHeadModel(cfg).eval()
    if arch == "neox":
        cfg = GPTNeoXConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=3,
                            num_attention_heads=4, intermediate_size=64,
                            max_position_embeddings=64, **special)
        return GPTNeoXForCausalLM(cfg).eval()
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                      max_position_embeddings=64, **special)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def demo() -> ii.Model:
    return ii.load_model("demo")


@pytest.fixture(scope="session", params=ARCHS)
def arch_model(request, demo) -> tuple[str, ii.Model]:
    """(arch, model) for each architecture, sharing the demo tokenizer."""
    return request.param, ii.wrap(tiny_model(request.param, len(demo.tokenizer)), demo.tokenizer)


def layers(model: ii.Model, arch: str):
    top, name = LAYERS[arch]
    return getattr(getattr(model.module, top), name)


def checksum(module: torch.nn.Module) -> float:
    return float(sum(p.detach().double().sum() for p in module.parameters()))


def hook_count(module: torch.nn.Module) -> int:
    """Hooks on ``module``'s tree and patched forwards, not counting transformers' own output
    capturing hooks (transformers 5 installs them for good on the first forward asked for
    hidden states or attentions, e.g. by a pipeline or ``generate``)."""
    def ours(table: dict) -> int:
        return sum(not getattr(fn, "__module__", "").startswith("transformers.")
                   for fn in table.values())

    return sum(ours(m._forward_hooks) + ours(m._forward_pre_hooks) + len(m._backward_hooks)
               + len(m._backward_pre_hooks) + ("forward" in m.__dict__)
               for m in module.modules())


@contextmanager
def hooks(*pairs):
    """Register (module, forward-hook) pairs for an oracle; remove them on exit."""
    handles = [m.register_forward_hook(fn) for m, fn in pairs]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class TestingShell(InteractiveShell):
    """An InteractiveShell whose run_cell raises instead of printing the traceback."""

    def run_cell(self, raw_cell, *args, **kwargs):
        result = super().run_cell(raw_cell, *args, **kwargs)
        result.raise_error()
        return result


@pytest.fixture
def shell(demo):
    sh = TestingShell.instance()
    sh.run_line_magic("load_ext", "ipy_intervene")
    sh.user_ns["model"] = demo
    sh.user_ns["ii"] = ii
    yield sh
    for name in [k for k in sh.user_ns if not k.startswith("_") and k not in ("In", "Out", "exit", "quit", "get_ipython")]:
        del sh.user_ns[name]


@pytest.fixture(params=[(a, impl) for a in LAYERS for impl in ("eager", "sdpa")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def attention_case(request, demo):
    """(arch, attention implementation, tiny model) on GPT-2, NeoX and Llama, eager and SDPA."""
    arch, impl = request.param
    module = tiny_model(arch, len(demo.tokenizer))
    module.set_attn_implementation(impl)
    return arch, impl, ii.wrap(module, demo.tokenizer)


def greedy_generate(model: ii.Model, prompt: torch.Tensor, steps: int) -> tuple:
    """``steps`` greedy tokens after ``prompt`` ([1, seq]) with plain ``generate``, every step
    run (no early end): the sequences and the logits of each step."""
    with torch.no_grad():
        out = model.module.generate(prompt, attention_mask=torch.ones_like(prompt),
                                    max_new_tokens=steps, min_new_tokens=steps,
                                    do_sample=False, output_logits=True,
                                    return_dict_in_generate=True,
                                    pad_token_id=model.tokenizer.pad_token_id)
    return out.sequences, torch.stack(out.logits, 1)


def tiny_family(model_type: str, vocab: int, **config) -> torch.nn.Module:
    """A seeded random model of ``model_type`` from ``AutoConfig.for_model(**config)``, in eval
    mode; the test is skipped when this transformers lacks the family."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        cfg = AutoConfig.for_model(model_type, vocab_size=vocab, **config)
    except (KeyError, ValueError) as error:
        pytest.skip(f"this transformers has no {model_type!r} ({error})")
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


class TinySAE(torch.nn.Module):
    """A random, seeded SAE: encode = ReLU(x W_enc + b_enc), decode = l W_dec + b_dec."""

    def __init__(self, d: int, m: int = 16, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.W_enc = torch.nn.Parameter(torch.randn(d, m, generator=gen) / d ** 0.5)
        self.b_enc = torch.nn.Parameter(torch.randn(m, generator=gen) * 0.3 - 0.2)
        self.W_dec = torch.nn.Parameter(torch.randn(m, d, generator=gen) / m ** 0.5)
        self.b_dec = torch.nn.Parameter(torch.randn(d, generator=gen) * 0.1)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x @ self.W_enc + self.b_enc)

    def decode(self, lat: torch.Tensor) -> torch.Tensor:
        return lat @ self.W_dec + self.b_dec
