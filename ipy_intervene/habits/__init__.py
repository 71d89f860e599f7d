"""Habits from other tools (nnsight, TransformerLens, transformers 4, plain PyTorch) that
mean something else here: each one a clear error saying what to write instead
(``explain``; TransformerLens's names in ``transformer_lens``).

Layer rule: imports ``arch``, ``infra`` and ``errors`` only.
"""
