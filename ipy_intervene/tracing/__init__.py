"""The ``%%trace`` pipeline in one function (``trace``: compile -> validate -> run ->
publish or undo), ``@ii.traced`` (``traced``) and the undo of a failing cell's names
(``namespace``).

Layer rule: imports ``widgets`` (the graph view), ``runtime``, ``compiler`` and below.
"""
