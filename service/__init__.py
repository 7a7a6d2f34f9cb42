"""The scoring service: REST and gRPC over one batching core (numpy, Pillow, ONNX Runtime; no torch)."""
