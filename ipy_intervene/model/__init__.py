"""The model and its inputs: the live module tree (``envoys``: ``ii.Model`` and its
envoys), loading (``loading``), inputs to one left-padded batch (``encode``, ``batch``,
``tokens``), devices (``placement``), prompt positions (``positions``) and where values
came from (``provenance``).

Layer rule: imports ``habits``, ``arch``, ``infra`` and ``errors``; never a cell or a run.
"""
