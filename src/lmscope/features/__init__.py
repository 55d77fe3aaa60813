"""``lmscope features``: learn a model's features (sparse dictionaries), explain each one, score every explanation.

``train(lm, corpus, site)`` trains a TopK / ReLU sparse autoencoder or a transcoder and ``evaluate`` measures
it on held-out text; ``load(folder)`` reads a SAELens-format dictionary; ``explain`` (in ``explain.py``) writes a
scored explanation for every latent or neuron. On one text (``analysis.py``): ``active_features`` (the features
active on each token), ``attribute_features`` (a target attributed to features, with the dictionary's error term
as its own row), ``compare_features`` (features a compressed model lost or distorted); ``load_explanations``
reads the scored explanations of a dictionary's features.
"""

from __future__ import annotations

from .analysis import active_features, attribute_features, compare_features, load_explanations
from .metrics import evaluate
from .sae import Dictionary, DictionaryConfig, load
from .train import TrainSettings, train, train_dictionary

__all__ = [
    "Dictionary",
    "DictionaryConfig",
    "TrainSettings",
    "active_features",
    "attribute_features",
    "compare_features",
    "evaluate",
    "load",
    "load_explanations",
    "train",
    "train_dictionary",
]
