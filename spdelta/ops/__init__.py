"""Tools on sparse deltas: compose, scale, prune, merge (a registry of methods), quantize.

Every function is pure: it returns a new :class:`~spdelta.SparseDelta` and never modifies
its inputs. Each tool also has a per-tensor kernel on ``(indices, values)`` pairs
(``prune_tensor``, ``merge_tensor``, ``quantize_tensor``, ...), so a streaming tool can
process one tensor at a time with memory bounded by the largest tensor.

Example:
    >>> import torch
    >>> from spdelta import SparseDelta
    >>> from spdelta import ops
    >>> d = SparseDelta({"w": ((3,), torch.tensor([0, 2]), torch.tensor([1.0, -2.0]))})
    >>> ops.compose(d, ops.negate(d)).to_dense("w").tolist()
    [0.0, 0.0, 0.0]
"""

from spdelta.ops._common import tensor_seed, union_sum
from spdelta.ops.compose import add, compose, drop_zeros, negate, prune, prune_tensor, scale
from spdelta.ops.merge import MERGE_METHODS, MergeMethod, merge, merge_tensor
from spdelta.ops.quantize import quantization_error, quantize, quantize_tensor
from spdelta.ops.sequence import sequence_tensor, then_tensor
from spdelta.ops.sparsify import drop_random, trim_magnitude, trim_outliers

# The quantized representation lives beside SparseDelta (the format reads and writes it
# without the maths); it is re-exported here next to the quantizer that produces it.
from spdelta.quantized import (
    QuantizedDelta,
    QuantizedTensor,
    dequantize,
    dequantize_tensor,
    pack_int4,
    unpack_int4,
)

__all__ = [
    "MERGE_METHODS",
    "MergeMethod",
    "QuantizedDelta",
    "QuantizedTensor",
    "add",
    "compose",
    "dequantize",
    "dequantize_tensor",
    "drop_random",
    "drop_zeros",
    "merge",
    "merge_tensor",
    "negate",
    "pack_int4",
    "prune",
    "prune_tensor",
    "quantization_error",
    "quantize",
    "quantize_tensor",
    "scale",
    "sequence_tensor",
    "tensor_seed",
    "then_tensor",
    "trim_magnitude",
    "trim_outliers",
    "union_sum",
    "unpack_int4",
]
