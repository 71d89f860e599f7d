"""Habits from nnsight, TransformerLens, transformers 4 and plain PyTorch that used to end in a
raw error or a plausible wrong value: each is now a clear error naming the cell line and what
to write instead, and a failing cell publishes nothing and leaves no hook."""

from __future__ import annotations

import pytest
import torch
from IPython.core.error import UsageError

import ipy_intervene as ii
from ipy_intervene.errors import InputError, InterventionError, SiteError
from conftest import CORRUPT, PROMPT, hook_count, hooks

ENDED = PROMPT + " Mary"  # a whole sentence: the demo model chooses end-of-text after "."


def run(shell, cell: str, error: type[Exception], match: str) -> Exception:
    """Run ``cell``; it must fail with ``error`` matching ``match`` and leave nothing behind."""
    before = set(shell.user_ns)
    with pytest.raises(error, match=match) as info:
        shell.run_cell(cell)
    assert set(shell.user_ns) - before <= {"_", "__", "___"} | {k for k in shell.user_ns
                                                                 if k.startswith("_i")}
    assert hook_count(shell.user_ns["model"].module) == 0
    return info.value


@pytest.mark.parametrize("body, match", [
    ("h = model.transformer.h[0].output.save()", r"line 2: `\.save\(\)` is nnsight's.*Drop"),
    ("h = model.transformer.h[0].output\nx = h.value", r"line 3: `\.value` is nnsight's"),
    ("with model.trace(clean):\n    h = model.transformer.h[0].output",
     r"line 2: `with model.trace\(\.\.\.\)` is nnsight's.*%%trace model PROMPT"),
])
def test_nnsight_habits_say_what_to_write_here(shell, body, match):
    shell.user_ns["clean"] = PROMPT
    run(shell, f"%%trace model clean\n{body}\n", InterventionError, match)


def test_backward_without_grad_says_add_grad(shell):
    cell = "%%trace model clean\nlogits = model.lm_head.output\nlogits[0, -1, 5].backward()\n"
    shell.user_ns["clean"] = PROMPT
    error = run(shell, cell, InterventionError, r"line 3: backward\(\) needs autograd.*--grad")
    assert "does not require grad" in str(error.__cause__)


def test_a_layers_output_0_is_refused_not_batch_row_0(shell):
    shell.user_ns["clean"] = PROMPT
    run(shell, "%%trace model clean\nh = model.transformer.h[0].output[0]\n", SiteError,
        r"line 2: `model.transformer.h\[0\].output` is the hidden states.*\[1, 15, 128\]"
        r".*batch row 0")
    # [0] where it is right: the attention's (output, weights) pair, and logits' row 0
    shell.run_cell("%%trace model clean\na = model.transformer.h[0].attn.output[0]\n"
                   "row = model.lm_head.output[0]\nh = model.transformer.h[0].output[0, ...]\n")
    assert shell.user_ns["a"].shape == (1, 15, 128)
    assert shell.user_ns["row"].shape == (15, 198) and shell.user_ns["h"].shape == (15, 128)


def test_a_module_list_as_a_site_says_index_it(shell):
    shell.user_ns["clean"] = PROMPT
    run(shell, "%%trace model clean\nh = model.transformer.h.output\n", SiteError,
        r"line 2: model.transformer.h is a ModuleList.*`model.transformer.h\[0\].output`")


def test_a_module_list_reached_through_a_function_says_index_it(shell):
    shell.user_ns.update(clean=PROMPT, site=lambda envoy: envoy.output)
    run(shell, "%%trace model clean\nh = site(model.transformer.h)\n", SiteError,
        r"ModuleList.*Index it")


def test_another_models_sites_name_both_models(shell, demo):
    shell.user_ns.update(clean=PROMPT, m2=ii.load_model("demo"))
    run(shell, "%%trace m2 clean\nh = model.transformer.h[0].output\n", SiteError,
        r"line 2: this cell traces `m2`, but this line uses `model`, another model")
    assert hook_count(shell.user_ns["m2"].module) == 0


@pytest.mark.parametrize("make, match", [
    (lambda ids: ids.clone().fill_(100_000), r"token id 100000 is outside.*0\.\.197"),
    (lambda ids: torch.cat([ids[:, :1], -ids[:, 1:2], ids[:, 2:]], 1), r"token id -\d+ is outside"),
    (lambda ids: {"input_ids": ids, "attention_mask": torch.ones(1, ids.shape[1] + 2)},
     r"attention mask has shape \[1, 17\], the token ids \[1, 15\]"),
])
def test_bad_token_inputs_are_input_errors(shell, demo, make, match):
    shell.user_ns["x"] = make(demo.to_tokens(PROMPT))
    run(shell, "%%trace model x\nlogits = model.lm_head.output\n", InputError, match)


def test_generating_past_the_models_positions_is_an_input_error(shell, demo):
    shell.user_ns["clean"] = PROMPT
    limit = demo.max_length
    run(shell, f"%%trace model clean --generate {limit}\nout = tracer.output\n", InputError,
        rf"15 tokens long and generate adds {limit}; this model has {limit} positions")


def test_the_step_loop_ends_where_generation_does_unless_eos_is_ignored(shell):
    shell.user_ns["ended"] = ENDED
    cell = ("%%trace model ended --generate 5{}\nnorms = []\nfor step in tracer.steps():\n"
            "    norms.append(model.transformer.h[0].output.norm())\n")
    shell.run_cell(cell.format(""))  # end-of-text chosen at step 1: the loop ends there
    assert len(shell.user_ns["norms"]) == 2 and shell.user_ns["_trace"].steps == 2
    shell.run_cell(cell.format(" --ignore-eos"))
    assert len(shell.user_ns["norms"]) == 5 and shell.user_ns["_trace"].steps == 5


def test_ignore_eos_without_generate_is_a_usage_error(shell):
    with pytest.raises(UsageError, match="--ignore-eos goes with --generate"):
        shell.run_cell("%%trace model 'x' --ignore-eos\nh = model.transformer.h[0].output\n")


# -- attention patterns ------------------------------------------------------------------------

@pytest.fixture
def eager(demo) -> ii.Model:
    return ii.load_model("demo", attn_implementation="eager")


def test_a_pattern_that_sdpa_does_not_compute_is_an_error_not_none(shell, demo):
    assert demo.module.config._attn_implementation == "sdpa"
    shell.user_ns["clean"] = PROMPT
    run(shell, "%%trace model clean\nw = model.transformer.h[0].attn.output[1]\n", SiteError,
        r"line 2: .*attn.output\[1\]` \(the attention pattern\) is None.*'sdpa'.*"
        r"attn_implementation=\"eager\"")
    ids = demo.to_tokens(PROMPT)
    shell.user_ns["x"] = {"input_ids": ids, "output_attentions": True}
    run(shell, "%%trace model x\nlogits = model.lm_head.output\n", InputError,
        r"output_attentions=True would give no patterns.*'sdpa'")


def test_with_eager_attention_the_pattern_is_the_models_own(shell, eager):
    shell.user_ns.update(model=eager, clean=PROMPT)
    shell.run_cell("%%trace model clean\nw = model.transformer.h[1].attn.output[1]\n")
    seen = {}
    with hooks((eager.module.transformer.h[1].attn, lambda m, a, o: seen.__setitem__("w", o[1]))):
        eager.module(eager.to_tokens(PROMPT))
    assert torch.equal(shell.user_ns["w"], seen["w"])
    ids = eager.to_tokens(PROMPT)
    shell.user_ns["x"] = {"input_ids": ids, "output_attentions": True}
    shell.run_cell("%%trace model x\nout = model.output\n")
    assert torch.equal(shell.user_ns["out"].attentions[1], seen["w"])


# -- gradients of every invoke -----------------------------------------------------------------

def test_grad_with_clean_and_corrupted_invokes_through_the_magic(shell, demo):
    """nnsight's attribution-patching tutorial, as a %%trace cell."""
    shell.user_ns.update(clean=PROMPT, corrupt=CORRUPT, a=demo.token_id("Mary"),
                         b=demo.token_id("John"))
    shell.run_cell(
        "%%trace model --grad\n"
        "with tracer.invoke(clean):\n    clean_acts = [l.output for l in model.transformer.h]\n"
        "with tracer.invoke(corrupt):\n    acts = [l.output for l in model.transformer.h]\n"
        "    for x in acts:\n        x.retain_grad()\n"
        "    logits = model.lm_head.output\n"
        "    (logits[:, -1, a] - logits[:, -1, b]).sum().backward()\n"
        "grads = [x.grad for x in acts]\n")
    grads = shell.user_ns["grads"]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    ids = demo.to_tokens(CORRUPT)
    outs = []
    with hooks(*[(layer, lambda m, i, o: outs.append(o) or o.retain_grad())
                 for layer in demo.module.transformer.h]):
        logits = demo.module(ids).logits
    (logits[:, -1, shell.user_ns["a"]] - logits[:, -1, shell.user_ns["b"]]).sum().backward()
    demo.module.zero_grad(set_to_none=True)
    for ours, theirs in zip(grads, outs):  # the batch of two changes float order slightly
        torch.testing.assert_close(ours, theirs.grad, rtol=0, atol=1e-5)


# -- token ids of answer words -----------------------------------------------------------------

def test_token_id_is_the_id_the_prompt_uses_and_refuses_ambiguous_words(demo):
    """`tokenizer.encode(" John")` starts with BOS on the demo (as on Llama): a metric built
    the GPT-2 way would measure BOS. `model.token_id` is what the examples teach."""
    assert demo.tokenizer.encode(" John")[0] == demo.tokenizer.bos_token_id
    tokens = demo.to_str_tokens(PROMPT)
    assert demo.to_tokens(PROMPT)[0, tokens.index("John")] == demo.token_id(" John")
    with pytest.raises(InputError, match="2 tokens"):
        demo.token_id("Mary John")


def test_the_examples_take_answer_ids_from_model_token_id():
    import json
    import re
    from pathlib import Path

    root = Path(__file__).parent.parent
    sources = re.findall(r"```python\n(.*?)```", (root / "README.md").read_text(), re.S)
    for notebook in sorted((root / "examples").glob("*.ipynb")):
        cells = json.loads(notebook.read_text())["cells"]
        sources += ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
    code = "\n".join(sources)
    assert "tokenizer.encode(" not in code and '["input_ids"][0]' not in code
    assert "token_id(" in code
