"""What a new kernel waits for: ``import ipy_intervene`` (torch's share apart), and building a
sweep view the first time and the second time in the process, in a script (plotly's import
is in the first view) and after ``%load_ext ipy_intervene``, which imports it in the
background while the model loads and the sweep runs.

    python benchmarks/first_view.py
"""

from __future__ import annotations

import time
import warnings


def main() -> None:
    warnings.filterwarnings("ignore")
    start = time.perf_counter()
    import torch  # noqa: F401 - timed on its own: most of the import is torch's

    torch_s = time.perf_counter() - start
    start = time.perf_counter()
    import ipy_intervene as ii

    ours_s = time.perf_counter() - start
    model = ii.load_model("demo")
    clean = "When Mary and John went to the store , John gave a drink to"
    corrupt = "When Mary and John went to the store , Mary gave a drink to"
    result = ii.patch_sweep(model, clean, corrupt, ii.logit_diff("Mary", "John"))
    views = []
    for _ in range(2):
        start = time.perf_counter()
        result._repr_mimebundle_()
        views.append(time.perf_counter() - start)
    print(f"import: torch {torch_s:.2f} s, then ipy_intervene {ours_s:.2f} s; sweep view in a "
          f"script: first {views[0]:.2f} s, second {views[1]:.2f} s")
    print(f"first sweep view after %load_ext, loading and a sweep: {after_load_ext():.2f} s")


def after_load_ext() -> float:
    """The first view's build time in a fresh IPython process that ran ``%load_ext``."""
    import subprocess
    import sys

    code = """
import time, warnings; warnings.filterwarnings("ignore")
from IPython.testing.globalipapp import start_ipython
ip = start_ipython()
ip.run_cell("%load_ext ipy_intervene\\nimport ipy_intervene as ii\\nmodel = ii.load_model('demo')")
ip.run_cell('r = %patch_sweep model --clean "When Mary and John went to the store , John gave a '
            'drink to" --corrupted "When Mary and John went to the store , Mary gave a drink '
            'to" --metric logit_diff("Mary", "John") --quiet')
start = time.perf_counter(); ip.user_ns["r"]._repr_mimebundle_()
print(time.perf_counter() - start)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    return float(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
