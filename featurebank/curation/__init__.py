"""featurebank.curation: what to do with the vectors next. Find label errors, outliers and
duplicates that hurt (:func:`audit_images`), choose which images to label next
(:func:`select_images`), see the data on a 2-D map (:func:`map_images`), and contact sheets
of the images a person should look at (:func:`write_contact_sheet`).

A join: it reads the store (embedding what is missing), the classifiers and the search room;
it never imports torch, argparse or HTTP.
"""

from featurebank.curation.audit import (
    ISSUE_KINDS,
    audit_vectors,
    baseline_label_issues,
    find_conflicts,
    find_label_issues,
    find_leaks,
    out_of_fold_proba,
    outlier_scores,
)
from featurebank.curation.images import audit_images, audit_store, map_images, select_images
from featurebank.curation.map import MAP_METHODS, check_map_method, project_2d, write_map
from featurebank.curation.select import STRATEGIES, k_center_greedy, select_vectors
from featurebank.curation.sheets import write_contact_sheet

__all__ = [
    "audit_images", "audit_store", "select_images", "map_images", "audit_vectors", "out_of_fold_proba",
    "find_label_issues", "baseline_label_issues", "outlier_scores", "find_conflicts", "find_leaks", "ISSUE_KINDS",
    "select_vectors", "k_center_greedy", "STRATEGIES", "project_2d", "write_map", "check_map_method", "MAP_METHODS",
    "write_contact_sheet",
]
