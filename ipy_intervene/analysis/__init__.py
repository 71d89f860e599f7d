"""Analyses that read a model's activations: ``ii.cache`` (``cache``), the logit lens
(``lens``), attention patterns (``patterns``), direct logit attribution (``decompose``),
sweep metrics (``metrics``) and the shared reading blocks the engines above use (sweep
inputs ``inputs``, the positions a metric reads ``reads``).

Layer rule: imports ``tracing``, ``widgets``, ``model`` and below; never an engine.
"""
