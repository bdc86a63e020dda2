"""intsim: DopQ-ViT post-training quantization of Vision Transformers and a bit-exact integer simulator."""

__version__ = "0.1.0"
