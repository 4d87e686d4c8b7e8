"""Generated protobuf/gRPC stubs (see client/python/generate_stubs.py)."""
