"""What a KV block is, independent of how it is computed or moved: its layout (bytes per block), its name (a
chained hash) and its checksum. Torch-free, so the kv-store and the gateway share it with the engine without
loading torch."""
