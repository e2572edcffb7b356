"""Tensor and sequence parallelism: mappings, parallel layers, vocab-parallel embedding/head/loss,
RNG regions, shard metadata, sharding plans and the per-variant rules (rules/)."""
