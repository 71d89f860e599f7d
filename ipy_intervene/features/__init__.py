"""Features: dictionaries (SAEs, transcoders, directions, subspaces) spliced at a site, so
their latents are sites of traces and sweeps.

>>> splice = ii.attach(model, model.transformer.h[2], ii.load_sae("demo"))  # doctest: +SKIP
"""

from ipy_intervene.features.activations import FeatureActivations, feature_activations
from ipy_intervene.features.dictionaries import Custom, Direction, Neurons, Subspace
from ipy_intervene.features.sae import SAE
from ipy_intervene.features.saelens import load_sae, save_sae
from ipy_intervene.features.splice import Splice, attach, attached, detach

__all__ = ["FeatureActivations", "feature_activations", "Custom", "Direction", "Neurons", "SAE", "Splice", "Subspace", "attach", "attached",
           "detach", "load_sae", "save_sae"]
