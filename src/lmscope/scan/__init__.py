"""``lmscope scan``: what every neuron and head does across a corpus — streamed, exact, resumable, on Ray.

``scan(lm, corpus, out, ...)`` runs a model over a corpus and writes exact per-unit statistics, top-k
contexts and (optionally) head statistics and activation dumps; ``load(out)`` reads a finished scan.
"""

from __future__ import annotations

from .corpus import Corpus
from .engine import scan
from .result import ScanResult, load

__all__ = ["Corpus", "ScanResult", "load", "scan"]
