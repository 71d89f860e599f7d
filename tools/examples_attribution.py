"""The cells of examples/attribution_graph.ipynb (``python tools/make_examples.py --execute
--only attribution_graph`` writes it)."""

from __future__ import annotations

from examples_common import CHECK, code, md


def attribution_graph() -> list:
    return [
        md("# Attribution graphs: from a prompt to the features that produce its answer\n\n"
           "Circuit tracing (Ameisen et al. 2025): each MLP of the demo model is replaced by a "
           "transcoder shipped with the package (`python -m ipy_intervene.demo.transcoder_train`"
           ", 512 latents per layer), attention patterns and norm scales are frozen at their "
           "values on the prompt, and the model becomes linear in its features. Every active "
           "feature, every error node (what a transcoder misses) and every token then has an "
           "exact direct effect on every later feature and on the answer."),
        code('%load_ext ipy_intervene\nimport torch\nimport ipy_intervene as ii\n\n'
             'model = ii.load_model("demo")\n'
             'tcs = ii.load_transcoders("demo")\n'
             'clean = "When Mary and John went to the store , John gave a drink to"\n'
             'mary, john = model.token_id("Mary"), model.token_id("John")'),
        md("## The IOI answer\n\nThe target is the logit difference Mary - John. The graph "
           "adds up: each node's input is its bias plus its incoming edges, to float "
           "rounding (`exactness`). The replacement score is the share of the influence that "
           "reaches the tokens through features rather than error nodes."),
        code('g = ii.attribution_graph(model, clean, tcs, target=ii.logit_diff("Mary", "John"))'
             '\nprint(g)'),
        code('print("exact to", g.exactness() < 1e-4)', metadata=CHECK),
        md("Pruned by influence (80% of the nodes' influence, 98% of the edges'), the "
           "strongest paths from the tokens to the answer, and the graph view: tokens along "
           "the bottom, layers going up, the answer on top; hover a node for its top "
           "activating tokens over a few prompts."),
        code('from ipy_intervene.circuit.graph_examples import top_activations\n\n'
             'pruned = g.prune()\nprint(pruned)\n'
             'for score, path in pruned.top_paths(3):\n'
             '    print(round(score, 3), " -> ".join(path))'),
        code('prompts = [clean, "When Tom and Lucy went to the park , Lucy gave a book to",\n'
             '           "The Thuzor Quenosk Fountain is in the city of"]\n'
             'feats = [n for n in pruned.kept if n.startswith("f")]\n'
             'tops = top_activations(g, prompts, k=3, nodes=feats)\n'
             'g.show(top_tokens=tops, groups={"S2 \'John\' features": [n for n in feats '
             'if n.split(".")[1] == "10"][:4]}, max_edges=200)'),
        md("## An intervention that flips the answer\n\nZero the 40 features that push "
           "Mary hardest and make the 5 that push John five times stronger. The graph's "
           "prediction equals the frozen model's; the unfrozen model (attention and norms "
           "live, each transcoder's real nonlinearity) is shown beside it: the difference is "
           "the method's approximation."),
        code('row = g.adjacency[g.nodes.index("logit:diff"), :len(g.nodes.features)]\n'
             'edits = {g.ids[i]: 0 for i in row.argsort(descending=True)[:40].tolist()}\n'
             'edits.update({g.ids[i]: ("scale", 5.0) for i in row.argsort()[:5].tolist()})\n'
             'r = g.intervene(edits)\n'
             'print(f"predicted {float(r.predicted[0]):+.2f}, frozen {float(r.frozen[0]):+.2f},'
             ' unfrozen {float(r.unfrozen[0]):+.2f}")\n'
             'print("before:", r.top_before[0][0], " after:", r.top_after[0][0])',
             metadata=CHECK),
        md("The same edits inside a `%%trace` cell, in one call: `g.apply(model, edits)` "
           "writes them into the running forward (each MLP its transcoder plus the error "
           "recorded on the prompt, as `intervene` does), so the cell's logits are the "
           "unfrozen model's above. With `errors=\"live\"` (each MLP's own output plus the "
           "change the edits make) it applies to any prompts, a node's position counted from "
           "each prompt's start or end (`align=`)."),
        code('%%trace model clean\ng.apply(model, edits)\nlogits = tracer.output'),
        code('print("the cell is the unfrozen model:", torch.allclose(logits[0, -1], r.after, '
             'atol=1e-5))\nprint("answer:", model.tokenizer.decode(logits[0, -1].argmax()))',
             metadata=CHECK),
        md("## A factual-recall answer, from a magic line\n\n`%attribution_graph MODEL PROMPT "
           "--transcoders T` builds the graph, shows it pruned and binds it (`_graph`, and "
           "`--out NAME`). With no `--target`, the output nodes are the logits that cover 95% "
           "of the next-token probability."),
        code('%attribution_graph model "The Thuzor Quenosk Fountain is in the city of" '
             '--transcoders tcs --max-edges 150 --out fact'),
        code('print(fact)\nprint(fact.nodes.logits, fact.incoming(fact.ids[-1], 5))'),
    ]
