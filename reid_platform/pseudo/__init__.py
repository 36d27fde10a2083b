"""Learning from unlabelled images: pseudo-identities by clustering, and self-training rounds.

- `distances`: sparse k-reciprocal Jaccard and cosine graphs of a set against itself (FAISS
  neighbours, never an N x N matrix);
- `clustering`: DBSCAN, spherical k-means and threshold linking, outliers, scores vs true ids;
- `labels`: unlabelled inputs, embedding with Ray Data, the pseudo-label manifest, report and
  pictures (`jobs/pseudo_label.py`);
- `rounds`: self-training rounds with Ray Train and MLflow parent / child runs
  (`jobs/self_train.py`);
- `experiment`: the labelled / unlabelled split used to measure it.
"""

from reid_platform.pseudo.clustering import (
    Clustering,
    ClusteringError,
    cluster_features,
    score_clustering,
)
from reid_platform.pseudo.distances import DistanceError, cosine_graph, jaccard_graph

__all__ = [
    "Clustering",
    "ClusteringError",
    "DistanceError",
    "cluster_features",
    "cosine_graph",
    "jaccard_graph",
    "score_clustering",
]
