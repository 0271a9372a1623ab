"""Quantization of the compressed (or dense) model's linears: GPTQ and round-to-nearest (quantize.py, gptq.py), the
price of a width in bits (pricing.py, shared with the joint allocation), each matrix's sensitivity to a width
(sensitivity.py), and the formats on disk (formats.py: torchao's tensors in safetensors; compressed_tensors.py:
the compressed-tensors export that plain transformers loads)."""
from .pricing import quant_group, weight_bits
from .quantize import BITS, METHODS, SCHEMES, is_quantized, quantization_report, quantize_and_report, quantize_model

__all__ = ["BITS", "METHODS", "SCHEMES", "is_quantized", "quant_group", "quantization_report", "quantize_and_report",
           "quantize_model", "weight_bits"]
