"""Sweeps: activation patching, attribution patching and causal tracing over a grid of sites.

>>> import ipy_intervene as ii
>>> model = ii.load_model("demo")
>>> result = ii.patch_sweep(model, "When Mary and John went to the store , John gave a drink to",
...                         "When Mary and John went to the store , Mary gave a drink to",
...                         ii.logit_diff("Mary", "John"), site="resid_pre")
>>> tuple(result.values.shape), result.dims
((4, 15), ('layer', 'pos'))
"""

from ipy_intervene.sweep import api, memo
from ipy_intervene.sweep.result import SweepResult

#: ``ii.patch_sweep``: the same sweep again (same model, weights, inputs, options and a
#: built-in metric) gives the earlier result, marked ``extra["reused"]`` (see ``memo``)
patch_sweep = memo.memoized(api.patch_sweep)

__all__ = ["SweepResult", "patch_sweep"]
