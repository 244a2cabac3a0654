"""Moving KV blocks between an engine's paged cache and the kv-store: the worker-side half of the handoff."""

# The data planes by name, for every service's and the launcher's settings (this module stays torch-free):
# "ucx" (the default) and "tcp", alias "grpc", the gRPC streams every store serves.
KV_TRANSPORTS = ("ucx", "tcp", "grpc")

# The wire contract of the gRPC data plane, shared with the kv-store (which must not import the transports).
# One gRPC message of block bytes: well under the 4 MiB default limit, large enough that per-message cost is noise.
PIECE_BYTES = 1 << 20
REQUEST_ID_METADATA_KEY = "splitserve-request-id"  # names the request in the store's logs
