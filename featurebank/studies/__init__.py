"""featurebank.studies: measurements that answer the questions a user asks before committing
to a model: *which layer should I cut at?* and *how many labelled images do I need?*

Neither question is answered by one part of featurebank alone: a study exports a backbone
(several cut points in one graph), embeds a labelled image set once into the store, trains
the classifiers of :mod:`featurebank.classifiers` under a protocol that keeps test images
out of every fitting step, and reports the result as a table, JSON and a plot. This room
therefore sits downstream of export, embedder, store and classifiers, and nothing imports
it but the CLI.

* :func:`sweep_layers`: linear-probe accuracy of each layer (and pooling) on the same
  seeded stratified folds, with the recommended layer and the export command for it.
* :func:`fewshot_study`: accuracy against labelled images per class on a fixed held-out
  test split, transfer features against a no-transfer baseline on raw pixels.
"""

from featurebank.studies.fewshot import FewshotResult, fewshot_study
from featurebank.studies.protocol import draw_shots, make_folds, score_folds
from featurebank.studies.sweep import SweepResult, stage_layers, sweep_layers

__all__ = [
    "sweep_layers",
    "SweepResult",
    "stage_layers",
    "fewshot_study",
    "FewshotResult",
    "make_folds",
    "score_folds",
    "draw_shots",
]
