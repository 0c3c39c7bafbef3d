"""The fast path's kernels: a sparse-delta linear (custom autograd Function) and its SDDMM.

Which modules run them is :mod:`spdelta.route`'s business; this package holds only the
kernels.

Example:
    >>> import torch
    >>> from spdelta.kernels import sparse_delta_linear
    >>> sparse_delta_linear(torch.ones(1, 2), torch.zeros(1, 2), None, torch.tensor([0]),
    ...                     torch.tensor([3.0])).tolist()
    [[3.0]]
"""

from spdelta.kernels._linear import SparseDeltaLinear, merge_weight, sparse_delta_linear
from spdelta.kernels._sddmm import SampledGrad, sampled_grad, sampled_grad_dense

__all__ = [
    "SampledGrad",
    "SparseDeltaLinear",
    "merge_weight",
    "sampled_grad",
    "sampled_grad_dense",
    "sparse_delta_linear",
]
