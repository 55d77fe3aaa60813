"""``lmscope features``: learn a model's features (sparse dictionaries), explain each one, score every explanation.

``train(lm, corpus, site)`` trains a TopK / ReLU sparse autoencoder or a transcoder and ``evaluate`` measures
it on held-out text; ``load(folder)`` reads a SAELens-format dictionary; ``explain`` (in ``explain.py``) writes a
scored explanation for every latent or neuron.
"""

from __future__ import annotations

from .metrics import evaluate
from .sae import Dictionary, DictionaryConfig, load
from .train import TrainSettings, train, train_dictionary

__all__ = ["Dictionary", "DictionaryConfig", "TrainSettings", "evaluate", "load", "train", "train_dictionary"]
