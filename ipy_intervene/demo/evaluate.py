"""Quality of the demo model on its three tasks.

>>> from ipy_intervene.demo.evaluate import evaluate_dir
>>> evaluate_dir()                                            # doctest: +SKIP
DemoQuality(ioi_accuracy=1.0, ioi_logit_diff=..., fact_accuracy=1.0, induction_loss_ratio=...)

Run ``python -m ipy_intervene.demo.evaluate`` to print the figures of the shipped weights.
"""

from __future__ import annotations

import inspect
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ipy_intervene.demo import data
from ipy_intervene.model.batch import positions_from_mask

WEIGHTS_DIR = Path(__file__).parent / "weights"


@dataclass(frozen=True)
class DemoQuality:
    ioi_accuracy: float          # IO logit > S logit, on held-out name pairs
    ioi_logit_diff: float        # mean IO - S logit, on held-out name pairs
    fact_accuracy: float         # top-1 on every fact x template
    induction_loss_ratio: float  # loss on the first half / loss on the repeated half


def held_out_ioi(seed: int = 0) -> list[tuple[str, str, str]]:
    """(prompt, io, s) for every held-out pair, template, name order and subject."""
    rng = random.Random(seed + 1)
    _, held_out = data.name_pairs(seed)
    cases = []
    for x, y in held_out:
        for template in data.IOI_TEMPLATES:
            for a, b in ((x, y), (y, x)):
                for s, io in ((a, b), (b, a)):
                    prompt = data.ioi_prompt(template, a, b, s=s, place=rng.choice(data.PLACES),
                                             obj=rng.choice(data.OBJECTS))
                    cases.append((prompt, io, s))
    return cases


@torch.no_grad()
def last_logits(model: Any, tokenizer: Any, prompts: list[str]) -> torch.Tensor:
    """Next-token logits after each prompt, ``[len(prompts), vocab]``: the batch padded on
    the left, each prompt at the positions it has alone (position ids from the mask), its
    last logits at ``[:, -1]``, as an edited model (``ii.edit``) needs them.

    >>> last_logits(model.module, model.tokenizer, ["When Mary and John", "Then"]).shape
    ...                                                                   # doctest: +SKIP
    torch.Size([2, 1024])
    """
    enc = tokenizer(prompts, padding=True, padding_side="left", return_tensors="pt")
    kwargs = {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask}
    if "position_ids" in inspect.signature(model.forward).parameters:
        kwargs["position_ids"] = positions_from_mask(enc.attention_mask)
    return model(**kwargs).logits[:, -1]


def token_id(tokenizer, word: str) -> int:
    (tid,) = tokenizer(word, add_special_tokens=False).input_ids
    return tid


def ioi_scores(model, tokenizer, seed: int = 0) -> tuple[float, float]:
    cases = held_out_ioi(seed)
    logits = last_logits(model, tokenizer, [c[0] for c in cases])
    io = torch.tensor([token_id(tokenizer, c[1]) for c in cases])
    s = torch.tensor([token_id(tokenizer, c[2]) for c in cases])
    rows = torch.arange(len(cases))
    diff = logits[rows, io] - logits[rows, s]
    return (diff > 0).float().mean().item(), diff.mean().item()


def fact_accuracy(model, tokenizer, seed: int = 0) -> float:
    facts = data.make_facts(seed)
    prompts = [t.format(subject=f.subject) for f in facts for t in data.FACT_TEMPLATES]
    answers = torch.tensor([token_id(tokenizer, f.city) for f in facts for _ in data.FACT_TEMPLATES])
    predicted = last_logits(model, tokenizer, prompts).argmax(-1)
    return (predicted == answers).float().mean().item()


@torch.no_grad()
def induction_loss_ratio(model, tokenizer, seed: int = 0, n: int = 200, length: int = 10) -> float:
    rng = random.Random(seed + 2)
    words = data.vocabulary(seed)
    enc = tokenizer([data.induction_example(rng, words, length) for _ in range(n)],
                    return_tensors="pt")
    logits = model(input_ids=enc.input_ids).logits[:, :-1]
    losses = torch.nn.functional.cross_entropy(
        logits.transpose(1, 2), enc.input_ids[:, 1:], reduction="none")  # [n, 2 * length]
    first, second = losses[:, 1:length], losses[:, length + 1:]  # x2..xk, both halves
    return (first.mean() / second.mean()).item()


def evaluate(model, tokenizer, seed: int = 0) -> DemoQuality:
    acc, diff = ioi_scores(model, tokenizer, seed)
    return DemoQuality(acc, diff, fact_accuracy(model, tokenizer, seed),
                       induction_loss_ratio(model, tokenizer, seed))


def evaluate_dir(path: Path = WEIGHTS_DIR) -> DemoQuality:
    model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return evaluate(model, tokenizer)


if __name__ == "__main__":
    print(evaluate_dir())
