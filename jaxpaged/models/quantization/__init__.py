"""Quantized weights: the leaves `layers.linear` dispatches on, their kernels, online
quantization at load, and the checkpoint formats (docs/quantization.md)."""
from __future__ import annotations

from jaxpaged.models.quantization.config import (QUANTIZATION_CHOICES, QuantizationConfig,
                                                 load_quantization_config)
from jaxpaged.models.quantization.kernels import quantized_matmul
from jaxpaged.models.quantization.quantize import quantize
from jaxpaged.models.quantization.weights import (Fp8BlockWeight, Fp8Weight, Int4Weight, Int8W8A8Weight, Int8Weight,
                                                  QuantizedWeight, fuse_out, leaf_specs)

__all__ = ["QUANTIZATION_CHOICES", "Fp8BlockWeight", "Fp8Weight", "Int4Weight", "Int8W8A8Weight", "Int8Weight",
           "QuantizationConfig", "QuantizedWeight", "fuse_out", "leaf_specs", "load_quantization_config", "quantize",
           "quantized_matmul"]
