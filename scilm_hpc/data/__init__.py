"""Data: corpus readers, tokenization into HDF5 shards with a manifest, and the shard
dataset the training and evaluation jobs read (lazy, fork-safe, checked against the
manifest)."""
