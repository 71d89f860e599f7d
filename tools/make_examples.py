"""Writes the example notebooks (unexecuted); `python tools/make_examples.py --execute`
(`--only NAME` for one)
also runs them in place, without widget state and without plotly.js in the static outputs,
as they are committed (about 50 kB each; `make demo` re-executes them with plotly.js inlined).

Each notebook reproduces an experiment of the seeds on the embedded demo model.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import nbformat as nbf
from examples_attribution import attribution_graph
from examples_common import CHECK, IOI, SETUP, code, md
from examples_edits import edits
from examples_features import feature_circuits

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
FACT = 'fact = "The Thuzor Quenosk Fountain is in the city of"\nsubject = "Thuzor Quenosk Fountain"'


def ioi() -> list:
    return [
        md("# IOI: activation patching in one line\n\n"
           "The indirect-object-identification experiment of the seeds (Wang et al.; the IOI "
           "notebook of TransformerLens) on the embedded demo model: which activations carry "
           "the answer from the clean prompt into the corrupted one?"),
        code(SETUP + IOI),
        md("## Clean and corrupted runs\n\nThe logit difference `logit(Mary) - logit(John)` "
           "at the last position: positive when the model answers Mary."),
        code('%%trace model\nwith tracer.invoke(clean):\n'
             '    clean_logits = model.lm_head.output[0, -1]\n'
             'with tracer.invoke(corrupt):\n    corrupt_logits = model.lm_head.output[0, -1]'),
        code('clean_diff = float(clean_logits[mary] - clean_logits[john])\n'
             'corrupt_diff = float(corrupt_logits[mary] - corrupt_logits[john])\n'
             'print(f"clean {clean_diff:+.2f}, corrupted {corrupt_diff:+.2f}")', metadata=CHECK),
        md("## Patch the residual stream at every (layer, position)\n\n"
           "Each cell of the heatmap is the corrupted run with one clean activation patched "
           "in, normalised so the clean run is 1 and the corrupted run 0. Move the sliders or "
           "click a cell: the panel shows the next tokens under that patch."),
        code('%patch_sweep model --clean clean --corrupted corrupt '
             '--metric logit_diff("Mary", "John")'),
        code('print([(c["layer"], c["token"], round(c["value"], 2)) for c in _sweep.top(3)])',
             metadata=CHECK),
        md("The name's identity sits at S2 (`John`, position 10) up to layer 1 and at the last "
           "position from layer 2: attention in layer 1 moves it. The attention and MLP "
           "outputs, and single heads, say which components do the moving:"),
        code('%patch_sweep model --clean clean --corrupted corrupt '
             '--metric logit_diff("Mary", "John") --site attn_out --out attn'),
        code('%patch_sweep model --clean clean --corrupted corrupt '
             '--metric logit_diff("Mary", "John") --site mlp_out --out mlp'),
        code('%patch_sweep model --clean clean --corrupted corrupt '
             '--metric logit_diff("Mary", "John") --site head_out --out heads'),
        code('print("attention:", attn.top(1)[0], "\\nheads:", heads.top(2))'),
        md("## The same sweep, written by hand\n\n"
           "A `%%trace` cell records the clean residual stream; a second one runs 60 copies of "
           "the corrupted prompt in one forward, each with one (layer, position) patched. The "
           "two agree:"),
        code('%%trace model clean\nclean_in = [model.transformer.h[l].input for l in range(4)]'),
        code('%%trace model [corrupt] * 60\n'
             'for layer in range(4):\n'
             '    for pos in range(15):                  # row 15 * layer + pos patches (layer, pos)\n'
             '        model.transformer.h[layer].input[15 * layer + pos, pos] = clean_in[layer][0, pos]\n'
             'logits = model.lm_head.output[:, -1]'),
        code('by_hand = (logits[:, mary] - logits[:, john]).view(4, 15)\n'
             'sweep = ii.patch_sweep(model, clean, corrupt, ii.logit_diff("Mary", "John"))\n'
             'print("max difference:", float((by_hand - sweep.raw).abs().max()) < 1e-4)',
             metadata=CHECK),
    ]


def attribution() -> list:
    return [
        md("# Attribution patching: the whole grid from two forwards and one backward\n\n"
           "The notes of the seeds (Neel Nanda's attribution patching): the effect of patching "
           "an activation is estimated by `(clean - corrupted) . gradient`. It is fast; it is "
           "an approximation. Screen with it, then verify the top sites exactly."),
        code(SETUP + IOI),
        code('%patch_sweep model --clean clean --corrupted corrupt '
             '--metric logit_diff("Mary", "John") --method attribution --out approx'),
        code('%patch_sweep model --clean clean --corrupted corrupt '
             '--metric logit_diff("Mary", "John") --quiet --out exact\n'
             'print(f"attribution {approx.seconds * 1e3:.0f} ms, exact {exact.seconds * 1e3:.0f} ms")'),
        md("## How good is the approximation?\n\nEach point is one (layer, position)."),
        code('import plotly.graph_objects as go\nfrom ipy_intervene.widgets import offline\n\n'
             'labels = [f"L{l} {t}" for l in exact.layers for t in exact.tokens]\n'
             'fig = go.Figure(go.Scatter(x=exact.values.flatten().tolist(), '
             'y=approx.values.flatten().tolist(),\n'
             '                           mode="markers", text=labels))\n'
             'fig.add_shape(type="line", x0=-0.2, y0=-0.2, x1=1.1, y1=1.1, line_dash="dot")\n'
             'fig.update_layout(xaxis_title="activation patching (exact)", '
             'yaxis_title="attribution patching",\n'
             '                  width=520, height=420)\noffline(fig)'),
        code('r = torch.corrcoef(torch.stack([exact.values.flatten(), approx.values.flatten()]))'
             '[0, 1]\nprint(f"correlation {r:.2f}")'),
        md("## Screen, then verify\n\nTake the five sites attribution ranks highest and patch "
           "exactly those:"),
        code('top = approx.top(5)\n'
             'for cell in top:\n'
             '    check = ii.patch_sweep(model, clean, corrupt, ii.logit_diff("Mary", "John"),\n'
             '                           layers=[cell["layer"]], positions=[cell["pos"]])\n'
             '    print(f"L{cell[\'layer\']} {cell[\'token\']:>10}: attribution '
             '{cell[\'value\']:+.2f}, exact {float(check.values):+.2f}")'),
    ]


def causal_tracing() -> list:
    return [
        md("# Causal tracing of a made-up fact\n\n"
           "ROME's procedure (Meng et al.; the causal-tracing notes of the seeds): noise the "
           "subject's token embeddings (3x their std, 10 noised copies, fixed seed), then "
           "restore the clean state of one (layer, position) at a time and see how much of "
           "the answer comes back. The demo model learned 60 made-up facts."),
        code(SETUP + FACT),
        code('%%trace model fact\nanswer = model.tokenizer.decode(model.lm_head.output[0, -1].argmax())'),
        code('print(answer)', metadata=CHECK),
        md("## The residual stream"),
        code('%patch_sweep model --clean fact --method noise --subject subject --site resid_post '
             '--out resid'),
        code('print(f"clean p = {resid.clean:.3f}, noised p = {resid.corrupted:.3f}")'),
        md("## MLP and attention outputs, restored over a window of 2 layers"),
        code('%patch_sweep model --clean fact --method noise --subject subject --site mlp_out '
             '--window 2 --out mlp'),
        code('%patch_sweep model --clean fact --method noise --subject subject --site attn_out '
             '--window 2 --out attn'),
        md("In this small model the recall reads all the subject's tokens from the last "
           "position, so restoring a single subject token brings back little, while the last "
           "position restores the answer from the first layer on."),
    ]


def generation_steering() -> list:
    return [
        md("# Steering generation at chosen steps\n\n"
           "`--generate N` runs `generate`; inside the cell, `tracer.steps()` walks the steps, "
           "and a site in the loop body is that step's. Here a steering vector (corrupted minus "
           "clean residual at the last position, layer 2) is added at the first step only."),
        code(SETUP + IOI),
        code('%%trace model\nwith tracer.invoke(clean):\n'
             '    h_clean = model.transformer.h[2].output[0, -1]\n'
             'with tracer.invoke(corrupt):\n    h_corrupt = model.transformer.h[2].output[0, -1]'),
        code('steer = h_corrupt - h_clean'),
        md("`tracer.output` is the prompt followed by the new tokens; the `TraceResult`'s "
           "`new_tokens` are the generated ones alone (generation stops at end-of-text)."),
        code('%%trace model clean --generate 4 --out plain\nfor step in tracer.steps():\n'
             '    pass'),
        code('%%trace model clean --generate 4 --out steered\nfor step in tracer.steps():\n'
             '    if step == 0:\n        model.transformer.h[2].output[:, -1] += steer'),
        code('print("plain:  ", model.tokenizer.decode(plain.new_tokens[0]))\n'
             'print("steered:", model.tokenizer.decode(steered.new_tokens[0]))', metadata=CHECK),
    ]


def logit_lens() -> list:
    return [
        md("# Logit lens\n\nThe residual stream after each layer, decoded through the final "
           "norm and the unembedding: when does the model know the answer? Move the sliders, "
           "or click a cell, to see the top tokens there."),
        code(SETUP + IOI),
        code('lens = ii.lens(model, clean)\nlens'),
        code('print([lens.top(layer, -1, 1)[0][0] for layer in range(4)])', metadata=CHECK),
        md("## From a `%%trace` cell\n\nAny residual streams a cell published work too:"),
        code('%%trace model corrupt\nacts = [model.transformer.h[l].output for l in range(4)]'),
        code('ii.lens(model, acts, tokens=model.to_str_tokens(corrupt))'),
    ]


def ioi_circuit() -> list:
    sweep = '%patch_sweep model --clean clean --corrupted corrupt --metric metric'
    return [
        md("# The IOI circuit of the demo model, end to end\n\n"
           "Seed 003's analysis (the IOI notebook of TransformerLens) on the embedded model, "
           "one short cell per step: the logit difference, direct logit attribution per layer "
           "and head, the head sweep, the patterns of the heads it finds, patching their "
           "queries, keys, values and patterns, and path patching to the final position. "
           "Every number is exact, on the Hugging Face model itself."),
        code(SETUP + IOI + '\nmetric = ii.logit_diff("Mary", "John")'),
        md("## The logit difference\n\n`logit(Mary) - logit(John)` at the last position."),
        code('%%trace model\nwith tracer.invoke(clean):\n    clean_logits = model.lm_head.output\n'
             'with tracer.invoke(corrupt):\n    corrupt_logits = model.lm_head.output'),
        code('diff = lambda logits: float(logits[0, -1, mary] - logits[0, -1, john])\n'
             'print(f"clean {diff(clean_logits):+.2f}, corrupted {diff(corrupt_logits):+.2f}")',
             metadata=CHECK),
        md("## Direct logit attribution\n\nThe residual stream at the last position, split "
           "into the embeddings, each head, each MLP and the biases: each one's share of the "
           "logit difference, with the final norm's scale frozen from the real run. The shares "
           "sum to the model's own logit difference."),
        code('dla = ii.decompose(model, clean, metric)\ndla'),
        code('print(f"sum {dla.total:+.3f}, model {dla.actual:+.3f}")\n'
             'print([(name, round(value, 2)) for name, value in dla.top(5)])', metadata=CHECK),
        md("## Which heads matter: patch each head's output\n\nEach cell: the corrupted run "
           "with one head's clean output at every position (clean = 1, corrupted = 0)."),
        code(sweep + ' --site head_out --out heads'),
        code('print([(c["layer"], c["head"], round(c["value"], 2)) for c in heads.top(4)])',
             metadata=CHECK),
        md("## Where those heads look\n\nTheir attention patterns: from the last token, "
           "each puts almost all its weight on one earlier token."),
        code('%%trace model clean\npattern = model.transformer.h[1].attn.pattern.output[0]'),
        code('tokens = model.to_str_tokens(clean)\n'
             'for head in (3, 0, 1):\n'
             '    weight, key = pattern[head, -1].max(-1)\n'
             '    print(f"L1H{head}: last token -> {tokens[key]!r} ({int(key)}), {float(weight):.2f}")',
             metadata=CHECK),
        md("The attention view: layer and head pickers, the picked head's token-by-token "
           "pattern (query rows, key columns) and every head of the layer beside it."),
        code('ii.attention_patterns(model, clean).show(layer=1, head=3)'),
        md("## Queries, keys, values or patterns?\n\nThe same head sweep, patching one input "
           "of each head at a time (four sweeps, one call):"),
        code(sweep + ' --site head_q,head_k,head_v,head_pattern --out parts --quiet'),
        code('for site, result in parts.items():\n'
             '    print(site, [(c["layer"], c["head"], round(c["value"], 2)) for c in result.top(2)])',
             metadata=CHECK),
        md("## Path patching\n\nEach head's output from the corrupted run, with every other "
           "head frozen at the clean run: its effect on the logits through the direct path "
           "(left), and through the values of the three layer-1 heads (right). Values near 1: "
           "no effect."),
        code(sweep + ' --method path --positions [-1] --out to_logits'),
        code(sweep + ' --method path --receivers [(1, 3), (1, 0), (1, 1)] --receiver-input v '
             '--out to_values'),
        code('print("direct:", [(c["layer"], c["head"], round(c["value"], 2)) for c in '
             'sorted(to_logits.top(16), key=lambda c: c["value"])[:3]])\n'
             'print("via values:", [(c["layer"], c["head"], round(c["value"], 2)) for c in '
             'sorted(to_values.top(16), key=lambda c: c["value"])[:2]])', metadata=CHECK),
        md(CIRCUIT),
    ]


CIRCUIT = """## The circuit

From the numbers above:

- **Mover heads in layer 1: L1H3, L1H0 and L1H1.** They have the largest direct shares of
  the logit difference (+4.76, +4.15, +2.55 of +15.00) and, with L0H2, the largest
  head-patching effects (0.42, 0.38, 0.20). From the last token each attends to `John` at
  position 10 (the repeated subject, S2) with 0.96-1.00 of its weight. Patching their
  *values* recovers as much as patching their outputs (0.42, 0.37), while their queries and
  keys barely matter (at most 0.04): what they read there decides the answer, not where they
  look. Path patching agrees: their effect reaches the logits directly (the corrupted head
  alone, everything else frozen, leaves 0.66, 0.72 and 0.83 of the clean logit difference).
- **L0H2 steers attention.** Its query and pattern patches matter (0.28 each), its output
  patch 0.27; it feeds the movers' values only a little (path patching through their values:
  0.96; L0H3: 0.93).
- **MLP 1** adds +3.17 directly, after the movers; **L3H3** pushes back (-1.73).
"""


def circuit_discovery() -> list:
    metric = 'ii.logit_diff("Mary", "John")'
    return [
        md("# Circuit discovery: attribution, AtP*, edge attribution, verified exactly\n\n"
           "Exact patching is the ground truth but costs a forward per cell; attribution "
           "patching is two forwards and a backward for the whole grid, with known false "
           "negatives (a saturated softmax hides what a query or key change does). AtP* "
           "(Kramár et al. 2024) fixes that for queries and keys; edge attribution (EAP, "
           "EAP-IG: Syed et al. 2023, Hanna et al. 2024) scores the edges between components. "
           "Every approximation here is checked against exact patching on the same model."),
        code(SETUP + IOI + f"\nmetric = {metric}"),
        md("## Head keys: attribution vs AtP* vs exact\n\nOne value per (layer, head): "
           "patching that head's keys from the clean run into the corrupted one. A key acts "
           "only through the softmax, where a linear estimate fails when the pattern "
           "saturates; the QK fix recomputes the pattern exactly."),
        code('exact = ii.patch_sweep(model, clean, corrupt, metric, site="head_k")\n'
             'estimates = {\n'
             '    "attribution": ii.patch_sweep(model, clean, corrupt, metric, site="head_k", '
             'method="attribution"),\n'
             '    "QK fix": ii.patch_sweep(model, clean, corrupt, metric, site="head_k", '
             'method="atp*", grad_drop=False),\n'
             '    "AtP* (QK fix + GradDrop)": ii.patch_sweep(model, clean, corrupt, metric, '
             'site="head_k", method="atp*"),\n}'),
        code('def top(result, k=5):\n'
             '    return {(c["layer"], c["head"]) for c in result.top(k)}\n\n'
             'truth = top(exact)\n'
             'print("exact top 5:", sorted(truth))\n'
             'for name, result in estimates.items():\n'
             '    print(f"{name:>24}: {len(top(result) & truth)} of 5, missed {sorted(truth - top(result))}")',
             metadata=CHECK),
        md("## Screen, then verify\n\nAtP* over the whole grid, exact patching of its top "
           "cells only, and (`check=True`) how many of the exact top cells the screen caught."),
        code('ii.screen_and_verify(model, clean, corrupt, metric, site="head_out", top=5, '
             'check=True)'),
        md("## Edges: EAP-IG\n\nA score for every edge of the component graph (embeddings, "
           "each head's q/k/v inputs and output, each MLP, the logits)."),
        code('edges = ii.edge_attribution(model, clean, corrupt, metric, method="eap-ig", '
             'steps=5)\nfor sender, receiver, score in edges.edges(8):\n'
             '    print(f"{sender:>6} -> {receiver:<8} {score:+.2f}")', metadata=CHECK),
        md("## The circuit, run exactly\n\nKeep the top edges; every other edge carries "
           "its corrupted value. The fraction of the clean - corrupted gap it recovers:"),
        code('for k in (10, 30, 100):\n'
             '    check = edges.circuit(top=k).verify()\n'
             '    print(f"top {k:>3} edges: recovers {check.recovered:.2f} of the gap")',
             metadata=CHECK),
        code('edges.circuit(top=30)'),
        md("The edges it keeps are the IOI story of this model: the embeddings feed MLP 0, "
           "whose output is what the layer-1 heads L1H3, L1H0 and L1H1 read as values (the "
           "names they move), and those heads and MLP 1 write the answer into the logits. "
           "Thirty of the 479 edges recover almost all of the clean - corrupted gap when run "
           "exactly; ten recover about half."),
    ]


NOTEBOOKS = {"feature_circuits": feature_circuits, "ioi_circuit": ioi_circuit, "ioi_activation_patching": ioi, "attribution_patching": attribution,
             "causal_tracing": causal_tracing, "generation_steering": generation_steering,
             "logit_lens": logit_lens, "circuit_discovery": circuit_discovery,
             "attribution_graph": attribution_graph, "edits": edits}


def main() -> None:
    os.environ["IPY_INTERVENE_PLOTLYJS"] = "none"  # inherited by the kernels
    only = sys.argv[sys.argv.index("--only") + 1] if "--only" in sys.argv else None
    for name, cells in NOTEBOOKS.items():
        if only is not None and name != only:
            continue
        nb = nbf.v4.new_notebook(cells=cells())
        nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python",
                                     "name": "python3"}
        path = EXAMPLES / f"{name}.ipynb"
        nbf.write(nb, path)
        if "--execute" in sys.argv:
            from ipy_intervene.report import execute

            nbf.write(execute(path), path)
        print("wrote", path)


if __name__ == "__main__":
    main()
