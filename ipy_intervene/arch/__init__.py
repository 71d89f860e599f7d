"""Everything about a model family: the site map of each architecture (``sites``), the
sites inside attention (``attention``) and where a site's value keeps its positions
(``layout``).

Layer rule: imports ``infra`` and ``errors`` only; every fact about a family lives here.
"""
