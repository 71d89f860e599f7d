"""Progress bars of long work (sweeps, caches, edge attribution): ``tqdm.auto``, quiet when
the environment says so.

>>> import os; os.environ["TQDM_DISABLE"] = "1"
>>> progress_disabled()
True
>>> del os.environ["TQDM_DISABLE"]
"""

from __future__ import annotations

import os


def progress_disabled() -> bool:
    """``TQDM_DISABLE=1`` turns the progress bars off, in a notebook too (tqdm's own notebook
    bar ignores the variable): for tests and exports whose outputs must not depend on how fast
    the machine is."""
    return os.environ.get("TQDM_DISABLE", "").lower() not in ("", "0", "false", "no")
