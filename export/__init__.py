"""Export of the noise-prediction U-Net to ONNX and TensorRT (needs the `export` extra)."""
