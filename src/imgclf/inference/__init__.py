"""Using a trained model: the predictor every model is, the model file, the
torch-free ONNX runtime, ONNX export, metrics, and loading either kind of file."""
