"""Generation options of a trace: sampling with a seed equals model.generate with that seed;
steered generation of natural length equals a per-prompt plain-hooks loop; options are
checked by name; the loss of a labelled INPUT; lengths and positions of every trace."""

from __future__ import annotations

import pytest
import torch

import ipy_intervene as ii
from ipy_intervene.errors import InputError, InterventionError
from conftest import PROMPT, checksum, hook_count

NATURAL = [PROMPT, "When Mary and John went to the store ,", "Then , Mary and John had"]
STEER = "for step in tracer.steps():\n    model.transformer.h[2].output[:, -1] += v\n"


def generate_alone(model, texts, n, hook=None, **kw):
    """model.generate on a left-padded batch (one prompt: no padding), a plain forward hook
    on block 2 (``hook``) while it runs."""
    enc = model.tokenizer(texts, return_tensors="pt", padding=True, padding_side="left")
    handle = model.module.transformer.h[2].register_forward_hook(hook) if hook else None
    try:
        with torch.no_grad():
            out = model.module.generate(**enc, max_new_tokens=n, pad_token_id=model.pad_id,
                                        **kw)
    finally:
        if handle is not None:
            handle.remove()
    return out


@pytest.mark.parametrize("options", [dict(temperature=1.5), dict(temperature=0.9, top_k=20),
                                     dict(top_p=0.8)])
@pytest.mark.parametrize("texts", [[PROMPT], NATURAL])
def test_sampling_with_a_seed_equals_model_generate_with_that_seed(demo, texts, options):
    state = torch.get_rng_state()
    ns = {"model": demo}
    result = ii.trace(demo, "x = 1", texts, namespace=ns, generate=10, do_sample=True, seed=7,
                      **options)
    assert torch.equal(torch.get_rng_state(), state)            # the global RNG is untouched
    torch.manual_seed(7)
    want = generate_alone(demo, texts, 10, do_sample=True, **options)
    assert torch.equal(result.output, want)
    again = ii.trace(demo, "x = 1", texts, namespace=ns, generate=10, do_sample=True, seed=7,
                     **options)
    assert torch.equal(again.output, result.output)


def test_other_seeds_draw_other_tokens(demo):
    outs = {tuple(ii.trace(demo, "x = 1", "The", generate=12, do_sample=True, temperature=2.0,
                           seed=s).new_tokens[0].tolist()) for s in range(4)}
    assert len(outs) > 1


def test_steered_generation_of_natural_length_equals_per_prompt_hooks(demo):
    torch.manual_seed(0)
    v = torch.randn(demo.config.n_embd) * 0.3
    ns = {"model": demo, "v": v}
    before = hook_count(demo.module), checksum(demo.module)
    result = ii.trace(demo, STEER + "    logits.append(model.lm_head.output)\n",
                      NATURAL, namespace={**ns, "logits": []}, generate=30)
    assert (hook_count(demo.module), checksum(demo.module)) == before

    def steer(module, args, out):
        h = out[0] if isinstance(out, tuple) else out
        h[:, -1] += v

    lengths = []
    for i, text in enumerate(NATURAL):
        alone = generate_alone(demo, [text], 30, hook=steer, do_sample=False)
        new = alone[0, len(demo.to_tokens(text)[0]):]
        assert torch.equal(result.generated[i], new), i
        assert int(new[-1]) == 0 and len(new) < 30              # stopped at end-of-text
        lengths.append(len(new))
    assert len(set(lengths)) == 3                                # three different stop steps
    assert result.steps == max(lengths)


def test_a_batch_whose_prompts_all_stop_ends_the_step_loop(demo):
    ns = {"model": demo, "v": torch.zeros(demo.config.n_embd), "seen": []}
    result = ii.trace(demo, STEER + "    seen.append(step)\nafter = tracer.output\n", NATURAL[:2],
                      namespace=ns, generate=20)
    assert ns["seen"] == list(range(result.steps)) and result.steps < 20
    assert torch.equal(ns["after"], result.output)
    assert [len(g) for g in result.generated] == [3, 8]


def test_options_are_checked_before_anything_runs(demo):
    ns = {"model": demo}
    before = hook_count(demo.module), checksum(demo.module), torch.get_rng_state()
    cases = [(dict(temprature=0.7, do_sample=True), "did you mean `temperature`"),
             (dict(max_new_tokens=4), "set by the trace: use --generate"),
             (dict(num_beams=2), "changes the rows of the batch"),
             (dict(temperature=0.7), "only apply when sampling"),
             (dict(seed=1), "greedy generation draws nothing"),
             (dict(do_sample=True, temperature=0), "temperature must be a number > 0"),
             (dict(do_sample=True, top_p=1.5), "top_p must be in"),
             (dict(output_scores=True), "read scores")]
    for options, message in cases:
        with pytest.raises(InputError, match=message):
            ii.trace(demo, "h = model.transformer.h[0].output", PROMPT, namespace=ns,
                     generate=3, **options)
    with pytest.raises(InterventionError, match="go with --generate N"):
        ii.trace(demo, "h = model.transformer.h[0].output", PROMPT, namespace=ns,
                 do_sample=True)
    assert "h" not in ns
    assert (hook_count(demo.module), checksum(demo.module)) == before[:2]
    assert torch.equal(torch.get_rng_state(), before[2])


def test_any_generate_keyword_passes_through(demo):
    got = ii.trace(demo, "x = 1", "Mary", generate=8, repetition_penalty=3.0).output
    assert torch.equal(got, generate_alone(demo, ["Mary"], 8, do_sample=False,
                                           repetition_penalty=3.0))
    plain = ii.trace(demo, "x = 1", "Mary", generate=8).output
    assert not torch.equal(got, plain)                         # it did something


def test_the_loss_of_a_labelled_input(demo):
    ids = demo.to_tokens(PROMPT)
    result = ii.trace(demo, "h = model.transformer.h[0].output",
                      {"input_ids": ids, "labels": ids})
    with torch.no_grad():
        want = demo.module(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(result.loss, want, rtol=0, atol=1e-6)
    assert ii.trace(demo, "x = 1", PROMPT).loss is None
    with pytest.raises(InterventionError, match="does not go with --generate"):
        ii.trace(demo, "x = 1", {"input_ids": ids, "labels": ids}, generate=2)


def test_lengths_and_positions_for_every_trace(demo):
    ns = {"model": demo}
    result = ii.trace(demo, "h = model.transformer.h[1].output", NATURAL, namespace=ns)
    assert result.lengths == [len(demo.to_tokens(t)[0]) for t in NATURAL]
    assert result.prompt_length == max(result.lengths) == ns["h"].shape[1]
    pos = result.positions
    assert pos.pad == ii.positions(demo, NATURAL).pad
    assert pos(2, "Then") == result.prompt_length - result.lengths[2] + 1
    generated = ii.trace(demo, "x = 1", NATURAL, generate=2)
    assert generated.prompt_length == max(result.lengths)
    with pytest.raises(InterventionError, match="did not generate"):
        result.new_tokens


# -- the %%trace line: the generation options' table (magics/command.py) -----------------------

def test_the_line_options_become_the_same_generate_keywords(demo):
    from ipy_intervene.magics.command import TraceCommand, generate_values

    line = ("model 'The' --generate 6 --do-sample --temperature 1.5 --top-k 20 --seed 3 "
            "--generate-kwargs dict(repetition_penalty=1.3) --quiet")
    command, texts = TraceCommand.parse(line).split_generation()
    assert command.options == "--generate 6 --quiet"
    options = generate_values(texts, lambda text, flag: eval(text))
    assert options == dict(do_sample=True, temperature=1.5, top_k=20, seed=3,
                           repetition_penalty=1.3)
    by_line = ii.trace(demo, "x = 1", "The", generate=6, **options).output
    torch.manual_seed(3)
    assert torch.equal(by_line, generate_alone(demo, ["The"], 6, do_sample=True,
                                               temperature=1.5, top_k=20,
                                               repetition_penalty=1.3))


def test_bad_generation_options_on_the_line_are_usage_errors():
    from IPython.core.error import UsageError

    from ipy_intervene.magics.command import TraceCommand, generate_values

    with pytest.raises(UsageError, match="--seed is given twice"):
        TraceCommand.parse("m 'x' --generate 2 --seed 1 --seed 2").split_generation()
    with pytest.raises(UsageError, match="--do-sample takes no value"):
        TraceCommand.parse("m 'x' --generate 2 --do-sample yes").split_generation()
    with pytest.raises(UsageError, match="--temperature needs a value"):
        TraceCommand.parse("m 'x' --generate 2 --temperature").split_generation()
    with pytest.raises(UsageError, match="must be a dict"):
        generate_values({"generate_kwargs": "[1]"}, lambda text, flag: eval(text))
    with pytest.raises(UsageError, match="sets seed, which the line sets too"):
        generate_values({"seed": "1", "generate_kwargs": "dict(seed=2)"},
                        lambda text, flag: eval(text))


def test_the_magic_samples_what_model_generate_draws_with_that_seed(shell, demo):
    shell.run_cell('%%trace model "When Mary and John went to the store" --generate 6 '
                   '--do-sample --temperature 0.7 --top-k 20 --seed 3 --quiet\n'
                   'tokens = tracer.output\n')
    ids = demo.to_tokens("When Mary and John went to the store")
    torch.manual_seed(3)
    want = demo.module.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                do_sample=True, temperature=0.7, top_k=20,
                                pad_token_id=demo.tokenizer.pad_token_id)
    assert torch.equal(shell.user_ns["tokens"], want)
    shell.run_cell('%%trace model "When Mary and John went to the store" --generate 6 '
                   '--do-sample --seed 3 --def draw()\nt = tracer.output\n')
    first, again = shell.user_ns["draw"]().names["t"], shell.user_ns["draw"]().names["t"]
    assert torch.equal(first, again)
    assert hook_count(demo.module) == 0
