"""qvec: zero-shot low-bit quantization of fine-tuned ViTs through quantization vectors."""

__version__ = "0.1.0"
