"""Train the embedded demo model: ``python -m ipy_intervene.demo.train``.

A 4-layer, 128-wide GPT-2 with a word-level tokenizer, trained on the synthetic tasks of
:mod:`ipy_intervene.demo.data` on the CPU in a few minutes with a fixed seed. It writes
``config.json``, ``model.safetensors`` and the tokenizer files into ``demo/weights/``,
then prints the quality figures of :mod:`ipy_intervene.demo.evaluate`.
"""

from __future__ import annotations

import argparse
import math
import random
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from tqdm.auto import tqdm
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from ipy_intervene.demo import data

WEIGHTS_DIR = Path(__file__).parent / "weights"
BOS, PAD, UNK = "<|endoftext|>", "<pad>", "<unk>"


def build_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``words`` that prepends ``<|endoftext|>`` (BOS)."""
    vocab = {tok: i for i, tok in enumerate([BOS, PAD, UNK] + words)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])])
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=BOS, eos_token=BOS, pad_token=PAD, unk_token=UNK,
        padding_side="left", clean_up_tokenization_spaces=False)


def build_model(vocab_size: int, tokenizer: PreTrainedTokenizerFast) -> GPT2LMHeadModel:
    config = GPT2Config(
        vocab_size=vocab_size, n_positions=64, n_embd=128, n_layer=4, n_head=4,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, activation_function="gelu",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    return GPT2LMHeadModel(config)


def batch_of(texts: list[str], tokenizer: PreTrainedTokenizerFast) -> dict[str, torch.Tensor]:
    """Right-padded ids with labels: every real token is a target, padding is not."""
    enc = tokenizer([t + f" {BOS}" for t in texts], padding=True, padding_side="right",
                    return_tensors="pt")
    labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
    return {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask, "labels": labels}


def train(steps: int = 4000, batch_size: int = 64, lr: float = 2e-3, seed: int = 0,
          out: Path = WEIGHTS_DIR) -> GPT2LMHeadModel:
    """Train from scratch and save to ``out``; deterministic for a given seed."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    pairs, _ = data.name_pairs(seed)
    facts = data.make_facts(seed)
    words = data.vocabulary(seed)
    tokenizer = build_tokenizer(words)
    model = build_model(len(tokenizer), tokenizer)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = steps // 20
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    model.train()
    bar = tqdm(range(steps), desc="training demo model")
    for step in bar:
        batch = batch_of([data.training_text(rng, pairs, facts, words)
                          for _ in range(batch_size)], tokenizer)
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    start = time.perf_counter()
    train(steps=args.steps, seed=args.seed, out=args.out)
    print(f"trained in {time.perf_counter() - start:.0f} s -> {args.out}")
    from ipy_intervene.demo.evaluate import evaluate_dir

    print(evaluate_dir(args.out))


if __name__ == "__main__":
    main()
