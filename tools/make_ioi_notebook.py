"""Writes examples/ioi_activation_patching.ipynb (unexecuted); `make examples` executes it."""

import nbformat as nbf

md, code = nbf.v4.new_markdown_cell, nbf.v4.new_code_cell
CHECK = {"tags": ["nbval-check-output"]}

cells = [
    md("# IOI: activation patching in one line\n\n"
       "The indirect-object-identification experiment of the seeds (Wang et al.; the IOI "
       "notebook of TransformerLens) on the embedded demo model: which activations carry the "
       "answer from the clean prompt into the corrupted one?"),
    code('%load_ext ipy_intervene\nimport ipy_intervene as ii\n\nmodel = ii.load_model("demo")\n'
         'clean = "When Mary and John went to the store , John gave a drink to"\n'
         'corrupt = "When Mary and John went to the store , Mary gave a drink to"'),
    md("## Clean and corrupted runs\n\nThe logit difference `logit(Mary) - logit(John)` at "
       "the last position: positive when the model answers Mary."),
    code('%%trace model\nwith tracer.invoke(clean):\n    clean_logits = model.lm_head.output[0, -1]\n'
         'with tracer.invoke(corrupt):\n    corrupt_logits = model.lm_head.output[0, -1]'),
    code('mary, john = model.token_id("Mary"), model.token_id("John")\n'
         'clean_diff = float(clean_logits[mary] - clean_logits[john])\n'
         'corrupt_diff = float(corrupt_logits[mary] - corrupt_logits[john])\n'
         'print(f"clean {clean_diff:+.2f}, corrupted {corrupt_diff:+.2f}")', metadata=CHECK),
    md("## Patch the residual stream at every (layer, position)\n\n"
       "Each cell of the heatmap is the corrupted run with one clean activation patched in, "
       "normalised so the clean run is 1 and the corrupted run 0. Move the sliders or click a "
       "cell: the panel shows the next tokens under that patch."),
    code('%patch_sweep model --clean clean --corrupted corrupt --metric logit_diff("Mary", "John")'),
    code('print([(c["layer"], c["token"], round(c["value"], 2)) for c in _sweep.top(3)])',
         metadata=CHECK),
]
nb = nbf.v4.new_notebook(cells=cells)
nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
nbf.write(nb, "examples/ioi_activation_patching.ipynb")
