"""Mirrors the proto package path (splitserve.v1) so generated imports resolve under splitserve.protos."""
