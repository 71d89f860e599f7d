"""The cells of examples/edits.ipynb (``python tools/make_examples.py --execute --only edits``
writes it)."""

from __future__ import annotations

from examples_common import CHECK, IOI, SETUP, code, md

ACCURACY = '''from ipy_intervene.demo.evaluate import held_out_ioi

cases = held_out_ioi()                       # (prompt, indirect object, subject), held-out names
prompts = [c[0] for c in cases]
io = torch.tensor([model.token_id(c[1]) for c in cases])
s = torch.tensor([model.token_id(c[2]) for c in cases])


def ioi_accuracy(m):
    """IO logit > S logit on the held-out prompts, and the mean logit difference."""
    with torch.no_grad():   # left padding: position -1 is each prompt's last token
        logits = m.module(**m.prepare(prompts).kwargs).logits[:, -1]
    diff = logits[torch.arange(len(cases)), io] - logits[torch.arange(len(cases)), s]
    return round((diff > 0).float().mean().item(), 3), round(diff.mean().item(), 2)


print(len(cases), "held-out prompts; accuracy, mean logit diff:", ioi_accuracy(model))'''


def edits() -> list:
    return [
        md("# Edits that last\n\n"
           "A `%%trace` cell with `--edit NAME` does not run once: it becomes an edit, and "
           "`NAME` is the model (the same weights, no copy) with the cell's interventions "
           "applied at every later forward: any batch, every generation step, sweeps, caches, "
           "and other libraries that call `NAME.module`. The original model is unchanged. "
           "Here: ablate the demo model's name-mover head, measure IOI accuracy before and "
           "after, sweep the edited model, and steer generation in a transformers pipeline."),
        code(SETUP + IOI + "\n\n" + ACCURACY, metadata=CHECK),
        md("## Ablate the name mover\n\nThe IOI circuit notebook finds head 3 of layer 1 "
           "(L1H3) moving the indirect object's name to the last position. Zero its slice of "
           "the out-projection's input (32 dimensions per head) for good:"),
        code("%%trace model --edit ablated\n"
             "model.transformer.h[1].attn.c_proj.input[:, :, 96:128] = 0"),
        code('print("original:", ioi_accuracy(model))\nprint("L1H3 ablated:", '
             'ioi_accuracy(ablated))\n[e.name for e in ii.edits(ablated)], ii.edits(model)',
             metadata=CHECK),
        md("## Sweep the edited model\n\nThe edit is part of the model the sweep analyses: "
           "with the name mover gone, the clean logit difference drops, and the cells that carry "
           "the answer are compared with `model`'s sweep."),
        code('%patch_sweep ablated --clean clean --corrupted corrupt '
             '--metric logit_diff("Mary", "John") --out edited_sweep --quiet\n'
             '%patch_sweep model --clean clean --corrupted corrupt '
             '--metric logit_diff("Mary", "John") --out original_sweep --quiet\n'
             'print("clean logit diff, original vs ablated:", round(original_sweep.clean, 2), '
             'round(edited_sweep.clean, 2))\n'
             'for sweep in (original_sweep, edited_sweep):\n'
             '    print([(c["layer"], c["token"], round(c["value"], 2)) for c in sweep.top(3)])', metadata=CHECK),
        md("## Steer every generated token, in a pipeline\n\n"
           "`for step in tracer.steps():` applies at every generation step (code outside the "
           "loop applies at the prompt's forward only, as in `--generate`). The steering vector "
           "is captured when the edit is made: changing `direction` later does not change "
           "`steered`. `steered.module` is a plain `nn.Module`, so a transformers pipeline "
           "runs it unchanged:"),
        code('wte = model.module.transformer.wte.weight.detach()\n'
             'direction = wte[john] - wte[mary]     # towards the subject\'s name'),
        code("%%trace model --edit steered\nfor step in tracer.steps():\n"
             "    model.transformer.h[2].output[:, -1] += 16 * direction"),
        code('from transformers import pipeline\n\n'
             'for m in (model, steered):\n'
             '    pipe = pipeline("text-generation", model=m.module, tokenizer=model.tokenizer)\n'
             '    print(repr(pipe(clean, max_new_tokens=3, do_sample=False)[0]["generated_text"]'
             '[len(clean):]))', metadata=CHECK),
        md("## Clear\n\n`ii.clear_edits(NAME)` removes every edit (no hook is left); "
           "`--edit NAME --inplace` edits the model itself, and `ii.clear_edits(model)` gives "
           "the original back."),
        code('ii.clear_edits(steered)\nii.clear_edits(ablated)\n'
             'print(ioi_accuracy(ablated) == ioi_accuracy(model))', metadata=CHECK),
    ]
