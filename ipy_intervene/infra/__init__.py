"""Infrastructure every layer above may use: hook lifetime (``hooks``), the running trace
and hook scope (``active``), cleanup Ctrl-C cannot cut in half (``interrupts``), the last
trace's positions (``last_trace``) and progress bars (``progress``).

Layer rule: imports only ``errors``; knows nothing of models, cells or analyses.
"""
