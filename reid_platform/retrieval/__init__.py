"""Gallery retrieval: the sharded, durable FAISS index used by the build job and Serve."""

from reid_platform.retrieval.index import (
    SearchResult,
    Shard,
    ShardedIndex,
    UnknownIdError,
    merge_topk,
    open_shard,
    read_manifest,
    shard_of,
    train_template,
)

__all__ = [
    "SearchResult",
    "Shard",
    "ShardedIndex",
    "UnknownIdError",
    "merge_topk",
    "open_shard",
    "read_manifest",
    "shard_of",
    "train_template",
]
