"""The cell compiler: a ``%%trace`` cell's AST to an intervention graph and the code of
each invoke (``compile``), with the statement walk (``rewrite``, ``rewrite_expr``), the
cell language (``syntax``), the invoke blocks and whose names are whose (``invokes``,
``invoke_setup``), the graph (``graph``) and its check against the module tree
(``validate``).

Layer rule: imports ``model`` and below; no torch in the AST half (everything but
``validate``).
"""
