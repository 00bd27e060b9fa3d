"""Cache store: holds the KV replicas token services send (in memory, spilled to disk past a budget) and serves them back for recovery."""
