"""Fine-tuning: train the top of a backbone and a linear head on cached activations.

A join (STYLE.md): it may import torch, timm, the export room, the store and the classifiers.
Import from the modules (``featurebank.finetune.model``, ``.head``, ``.train``); this package
file imports nothing, so ``import featurebank.finetune`` stays light.
"""
