"""The networks: the architecture table, the engines that run them (PyTorch,
ONNX Runtime), the frozen feature pass with its workspace cache, and devices."""
