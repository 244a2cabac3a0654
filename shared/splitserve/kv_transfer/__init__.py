"""Moving KV blocks between an engine's paged cache and the kv-store: the worker-side half of the handoff."""

# The data planes by name, for every service's and the launcher's settings (this module stays torch-free):
# "ucx" (the default) and "tcp", alias "grpc", the gRPC streams every store serves.
KV_TRANSPORTS = ("ucx", "tcp", "grpc")
