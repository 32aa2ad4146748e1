"""preshard: pre-shard LLM checkpoints for vLLM tensor-parallel serving."""

__version__ = "0.1.0"

GROUP = "preshard.io"
VERSION = "v1alpha1"
KIND = "ShardedCheckpoint"
PLURAL = "shardedcheckpoints"
