"""The benchmarks' shared set-up: a GPT-2-shaped model with random weights and an IOI-shaped
batch (the corrupted prompts differ from the clean ones at one position)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
from transformers import GPT2Config, GPT2LMHeadModel

import ipy_intervene as ii
from ipy_intervene.analysis.metrics import Metric


@dataclass
class Setup:
    model: ii.Model
    clean: torch.Tensor
    corrupt: torch.Tensor
    metric: Metric
    device: torch.device


def arguments(description: str) -> argparse.ArgumentParser:
    """``--device --layers --width --prompts --tokens`` (GPT-2 small, 8 x 15 by default)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=15)
    return parser


def gpt2_ioi(args: argparse.Namespace) -> Setup:
    device = torch.device(args.device)
    torch.manual_seed(0)
    config = GPT2Config(n_layer=args.layers, n_embd=args.width, n_head=args.width // 64,
                        vocab_size=50257)
    model = ii.wrap(GPT2LMHeadModel(config).eval().to(device))
    clean = torch.randint(0, 50257, (args.prompts, args.tokens), device=device)
    corrupt = clean.clone()
    corrupt[:, args.tokens // 2] = torch.randint(0, 50257, (args.prompts,), device=device)
    good, bad = torch.randint(0, 50257, (2, args.prompts)).tolist()
    return Setup(model, clean, corrupt, ii.logit_diff(good, bad), device)
