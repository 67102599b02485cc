"""Model Slicing: train a width-sliceable model, export one ONNX model per rate."""
