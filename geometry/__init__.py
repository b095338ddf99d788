"""Embedding-geometry metrics as pure torch functions (no Lightning), on any device, never N x N in memory."""

from geometry.cka import MinibatchCKA, linear_cka, rbf_cka
from geometry.continual import cl_metrics
from geometry.fewshot import fewshot_accuracy
from geometry.hierarchy import hierarchy_metrics, silhouette_score
from geometry.kmeans import adjusted_rand_index, clustering_scores, kmeans, normalized_mutual_info
from geometry.knn import knn_accuracy, knn_predict, knn_topk_accuracy
from geometry.linear_probe import fit_logistic, linear_probe, linear_probe_accuracy

__all__ = [
    "MinibatchCKA",
    "adjusted_rand_index",
    "cl_metrics",
    "clustering_scores",
    "fewshot_accuracy",
    "fit_logistic",
    "hierarchy_metrics",
    "kmeans",
    "knn_accuracy",
    "knn_predict",
    "knn_topk_accuracy",
    "linear_cka",
    "linear_probe",
    "linear_probe_accuracy",
    "normalized_mutual_info",
    "rbf_cka",
    "silhouette_score",
]
