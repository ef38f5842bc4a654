"""diffseg-engine: batched ensemble inference for diffusion-model tumour segmentation.

The runtime (this package, minus `diffseg_engine.train` and `diffseg_engine.export`) needs numpy,
nibabel and onnxruntime only; importing it never imports torch.
"""
__version__ = "0.1.0"
