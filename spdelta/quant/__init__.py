"""Quantised base weights (NF4, for qSpIEL): the base is stored in 4 bits and dequantised per op."""

from spdelta.quant.nf4 import dequantize_base, is_nf4, nbytes, nf4_to_dense, to_nf4

__all__ = ["dequantize_base", "is_nf4", "nbytes", "nf4_to_dense", "to_nf4"]
