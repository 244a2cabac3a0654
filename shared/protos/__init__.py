"""Generated gRPC stubs for the services' contracts (protos/splitserve/v1/*.proto).

Import as `from splitserve.protos.splitserve.v1 import decode_pb2, decode_pb2_grpc`. Never edit the generated
modules: change the .proto and run scripts/gen_protos.sh (tests/protos/test_protos.py fails while stale).
"""
