"""Cache store: holds KV replicas that token services send, for recovery (issue #3 completes it)."""
