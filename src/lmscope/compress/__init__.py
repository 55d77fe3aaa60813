"""Compress a model (quantize, prune, low-rank) and see what changed: ``compress(lm, Quantize("int8"))``."""

from .apply import CompressResult, compress
from .recipe import LowRank, PruneHeads, PruneLayers, PruneNeurons, PruneUnstructured, Quantize, Recipe

__all__ = [
    "compress",
    "CompressResult",
    "Recipe",
    "Quantize",
    "PruneHeads",
    "PruneUnstructured",
    "PruneNeurons",
    "PruneLayers",
    "LowRank",
]
