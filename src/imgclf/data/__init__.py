"""Images in: what an image is, finding them in folders, decoding, splits.

Torch-free: the ONNX runtime and the web server use it too.
"""
