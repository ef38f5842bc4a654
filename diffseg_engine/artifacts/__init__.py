"""Model files: the model card, safetensors weights, ONNX files (read without onnx), the step graph's
interface and TensorRT plans. Imports: numpy, safetensors; `core`, `io`.
"""
