"""Moving KV blocks between an engine's paged cache and the kv-store: the worker-side half of the handoff."""
