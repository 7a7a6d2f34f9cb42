"""MUSIQ core: configuration, decoding, multi-scale packing (numpy only), network and checkpoints (torch).

Importing this package imports nothing heavy: the numpy-only modules (config, decode, resize,
packing, checkpoint) are what the server uses; `model.network` and training pull in torch.
"""
