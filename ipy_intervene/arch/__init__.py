"""Everything about a model family: the site vocabulary and the Adapter (``adapter``), the
family table (``families``), discovery of a family the table lacks (``discover``), the
self-check every map passes before use (``check``), the maps of a model (``sites``:
``adapter_for``), the sites inside attention (``attention``), q/k/v layouts (``qkv``),
final-norm forms (``norms``) and where a site's value keeps its positions (``layout``).

Layer rule: imports ``infra`` and ``errors`` only; every fact about a family lives here.
"""
