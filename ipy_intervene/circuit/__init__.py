"""Edge attribution (EAP, EAP-IG) over the component graph, and circuits run exactly.

>>> import ipy_intervene as ii
>>> from ipy_intervene.circuit import edge_attribution
>>> model = ii.load_model("demo")
>>> r = edge_attribution(model, "When Mary and John went to the store , John gave a drink to",
...                      "When Mary and John went to the store , Mary gave a drink to",
...                      ii.logit_diff("Mary", "John"))
>>> round(r.circuit(top=r.graph.n_edges).verify().recovered, 4)
1.0
"""

from ipy_intervene.circuit.eap import edge_attribution
from ipy_intervene.circuit.graph import Graph, Node, build_graph
from ipy_intervene.circuit.result import Circuit, EdgeResult
from ipy_intervene.circuit.verify import VerifyResult, patch_edges, verify_circuit

__all__ = ["Circuit", "EdgeResult", "Graph", "Node", "VerifyResult", "build_graph",
           "edge_attribution", "patch_edges", "verify_circuit"]
