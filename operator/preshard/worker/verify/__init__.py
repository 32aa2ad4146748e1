"""Verification, as libraries: ``shards`` (file-level checks of rank files, the engine
check's comparison of tokens and log-probabilities), ``against`` (every saved tensor
rebuilt from the source bit for bit through the sharding metadata, no engine) and
``objects`` (a published checkpoint's objects against its manifest, size and sha256)."""
