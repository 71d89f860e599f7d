"""The cells of examples/feature_circuits.ipynb (written by tools/make_examples.py)."""

from __future__ import annotations

from examples_common import CHECK, IOI, SETUP, code, md

METRIC = 'ii.logit_diff("Mary", "John")'


def feature_circuits() -> list:
    return [
        md("# Feature circuits: an SAE spliced into the demo model\n\n"
           "Features instead of components (Marks et al., *Sparse Feature Circuits*): a sparse "
           "autoencoder shipped with the package (512 latents, trained by "
           "`python -m ipy_intervene.demo.sae_train` on the demo model's residual stream after "
           "block 2) is spliced at `transformer.h[2]`. Its latents become a site like any "
           "other: read and written in `%%trace`, swept by `%patch_sweep --site sae`, shown in "
           "a feature view."),
        code(SETUP + IOI + '\nsae = ii.load_sae("demo")\nsae'),
        md("## The splice changes nothing until you edit\n\nThe reconstruction error is kept "
           "(and detached for gradients, as SAELens does), so the spliced model computes the "
           "same logits, bit for bit:"),
        code('%%trace model clean\nbefore = model.lm_head.output'),
        code('splice = ii.attach(model, model.transformer.h[2], sae)\nii.attached(model)'),
        code('%%trace model clean\nafter = model.lm_head.output\n'
             'lat = model.transformer.h[2].sae.latents.output'),
        code('print("same logits:", torch.equal(before, after))\n'
             'print(f"active latents per token: {float((lat > 0).sum(-1).float().mean()):.1f} '
             'of {lat.shape[-1]}")', metadata=CHECK),
        md("## Latents that fire on names\n\nThe latents over a set of held-out IOI prompts "
           "(name pairs the demo model never saw in training), and for each latent the share "
           "of its activations that land on a name:"),
        code('from ipy_intervene.demo.data import NAMES\n'
             'from ipy_intervene.demo.evaluate import held_out_ioi\n\n'
             'prompts = [case[0] for case in held_out_ioi()[::8]]\n'
             'acts = ii.feature_activations(model, model.transformer.h[2].sae, prompts)\n'
             'width = acts.mask.shape[1]\n'
             'is_name = torch.zeros_like(acts.mask)\n'
             'for i, tokens in enumerate(acts.tokens):\n'
             '    for p, token in enumerate(tokens):\n'
             '        is_name[i, width - len(tokens) + p] = token.strip() in NAMES\n'
             'fires = acts.acts > 0\n'
             'on_names = (fires & is_name[..., None]).sum((0, 1)).float()\n'
             'share = on_names / fires.sum((0, 1)).clamp(min=1)\n'
             'name_latents = ((share > 0.9) & (fires.sum((0, 1)) >= 20)).nonzero().flatten().tolist()\n'
             'print(len(prompts), "prompts")\n'
             'for j in name_latents:\n'
             '    fired = acts.top_tokens(j, 1000)\n'
             '    different = len({t.token for t in fired if t.token.strip() in NAMES})\n'
             '    print(f"latent {j}: {float(share[j]):.2f} on names, {different} different names, "\n'
             '          f"strongest: {fired[0].context!r}")',
             metadata=CHECK),
        md("Each name latent is a *position* of a name in the template rather than a name: "
           "one fires on the first name after *When*, others on the second name of *A and B*. "
           "The feature view shows a latent's top activating tokens over the prompts and, "
           "below, which latents fire where in one prompt (pick a latent or a prompt):"),
        code('acts.show(latent=name_latents[-1], prompt=0)'),
        md("## The IOI behaviour, traced to a handful of latents\n\nClean: *... John gave a "
           "drink to* (answer Mary); corrupted: *... Mary gave a drink to* (answer John). "
           "Attribution over every latent x position (one clean and one corrupted forward, "
           "one backward), normalised so the clean run is 1 and the corrupted 0:"),
        code('%%trace model\nwith tracer.invoke(clean):\n'
             '    clean_lat = model.transformer.h[2].sae.latents.output\n'
             '    clean_logits = model.lm_head.output[0, -1]\n'
             'with tracer.invoke(corrupt):\n'
             '    corrupt_logits = model.lm_head.output[0, -1]'),
        code('clean_diff = float(clean_logits[mary] - clean_logits[john])\n'
             'corrupt_diff = float(corrupt_logits[mary] - corrupt_logits[john])\n'
             'print(f"logit(Mary) - logit(John): clean {clean_diff:+.2f}, corrupted '
             '{corrupt_diff:+.2f}")', metadata=CHECK),
        code('%patch_sweep model --clean clean --corrupted corrupt --metric '
             'logit_diff("Mary", "John") --site sae --method attribution --out attr'),
        code('top = [c["latent"] for c in attr.top(4)]\n'
             'for c in attr.top(4):\n'
             '    print(f"latent {c[\'latent\']} at {c[\'token\']}: {c[\'value\']:+.3f}")',
             metadata=CHECK),
        md("The screen's top cells are all at the last position. Exact activation patching of "
           "those latents (each cell: the corrupted run with one clean latent patched in, the "
           "error term kept), then all of them at once:"),
        code(f'exact = ii.patch_sweep(model, clean, corrupt, {METRIC}, site="sae", latents=top)\n'
             'for c in exact.top(4):\n'
             '    print(f"latent {c[\'latent\']} at {c[\'token\']}: {c[\'value\']:+.3f}")',
             metadata=CHECK),
        code('%%trace model corrupt\n'
             'model.transformer.h[2].sae.latents.output[:, -1, top] = clean_lat[:, -1, top]\n'
             'patched = model.lm_head.output[0, -1]'),
        code('patched_diff = float(patched[mary] - patched[john])\n'
             'share = (patched_diff - corrupt_diff) / (clean_diff - corrupt_diff)\n'
             'print(f"{len(top)} latents of 512 at one position: logit diff {patched_diff:+.2f}, '
             '{share:.2f} of the clean - corrupted gap")', metadata=CHECK),
        md("What do those latents read? They fire late in the prompt, on the punctuation and "
           "on the final *to*:"),
        code('acts.show(latent=top[0], prompt=0)'),
        md("## A coefficient sweep is a Python loop\n\n`--def` turns the cell into a function "
           "of the notebook (nothing runs when it is defined); each call runs the cell with "
           "its arguments bound and returns the `TraceResult`:"),
        code('%%trace model clean --def scale(latent, coef)\n'
             'model.transformer.h[2].sae.latents.output[:, -1, latent] *= coef\n'
             'logits = model.lm_head.output[0, -1]'),
        code('for coef in (0.0, 0.5, 1.0, 2.0):\n'
             '    logits = scale(top[0], coef).names["logits"]\n'
             '    print(f"latent {top[0]} x {coef}: logit diff {float(logits[mary] - '
             'logits[john]):+.2f}")', metadata=CHECK),
        md("## The error term\n\nWith the reconstruction error dropped, the model runs on the "
           "SAE's reconstruction alone at block 2:"),
        code('%%trace model clean\nmodel.transformer.h[2].sae.error.output[:] = 0\n'
             'recon = model.lm_head.output[0, -1]'),
        code('print(f"logit diff with the error kept {clean_diff:+.2f}, dropped '
             '{float(recon[mary] - recon[john]):+.2f}")', metadata=CHECK),
        code('ii.detach(model)\nprint(ii.attached(model))', metadata=CHECK),
    ]
