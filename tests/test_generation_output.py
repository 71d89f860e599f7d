"""A --generate trace's output is the prompt followed by what generate chose; ``new_tokens``
is the generated part alone (the prompt's last token is never decoded as generated)."""

from __future__ import annotations

import pytest
import torch

import ipy_intervene as ii
from ipy_intervene.errors import InterventionError
from conftest import PROMPT


def test_new_tokens_are_what_generate_adds_after_the_prompt(demo):
    ids = demo.to_tokens(PROMPT)
    want = demo.module.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                                do_sample=False, pad_token_id=demo.tokenizer.pad_token_id
                                or demo.tokenizer.eos_token_id)
    result = ii.trace(demo, "for step in tracer.steps():\n    pass", PROMPT,
                      namespace={"model": demo}, generate=4)
    assert torch.equal(result.output, want)
    assert result.prompt_length == ids.shape[1]
    assert torch.equal(result.new_tokens, want[:, ids.shape[1]:])
    assert result.new_tokens.shape[1] == result.steps  # one token a step


def test_new_tokens_of_a_forward_trace_say_generate(demo):
    result = ii.trace(demo, "h = model.transformer.h[0].output", PROMPT,
                      namespace={"model": demo})
    with pytest.raises(InterventionError, match="--generate N"):
        result.new_tokens
