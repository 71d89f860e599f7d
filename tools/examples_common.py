"""What every example notebook's cells share (tools/make_examples.py writes them all)."""

from __future__ import annotations

import nbformat as nbf

md, code = nbf.v4.new_markdown_cell, nbf.v4.new_code_cell
CHECK = {"tags": ["nbval-check-output"]}   # nbval compares this cell's output

SETUP = ('%load_ext ipy_intervene\nimport torch\nimport ipy_intervene as ii\n\n'
         'model = ii.load_model("demo")\n')
IOI = ('clean = "When Mary and John went to the store , John gave a drink to"\n'
       'corrupt = "When Mary and John went to the store , Mary gave a drink to"\n'
       'mary, john = model.token_id("Mary"), model.token_id("John")')
