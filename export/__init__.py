"""ONNX export: the bridge from a PyTorch checkpoint to the torch-free server.

`export.metadata` is numpy/json only (the server reads it through ONNX Runtime); the rest imports
torch and ONNX tooling and runs at export time.
"""
