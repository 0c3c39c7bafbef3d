"""The spdelta file format (``spec/format.md``): save, load, validate and inspect delta files.

Example:
    >>> import os, tempfile, torch
    >>> from spdelta import SparseDelta
    >>> from spdelta.format import load_delta, save_delta
    >>> path = os.path.join(tempfile.mkdtemp(), "d.safetensors")
    >>> d = SparseDelta({"w": ((2, 3), torch.tensor([1, 5]), torch.tensor([0.5, -1.0]))})
    >>> save_delta(d, path)
    >>> load_delta(path) == d
    True
"""

from spdelta.format.codec import choose_encoding, decode_indices, encode_indices, encoded_nbytes
from spdelta.format.constants import FORMAT_VERSION
from spdelta.format.inputs import CheckedInputs, check_inputs, file_sha256
from spdelta.format.read import TensorInfo, load_delta, load_patch, load_quantized, read_header
from spdelta.format.stream import DeltaReader, DeltaWriter
from spdelta.format.validate import Problem, validate_file
from spdelta.format.write import save_delta

__all__ = [
    "CheckedInputs",
    "DeltaReader",
    "DeltaWriter",
    "FORMAT_VERSION",
    "Problem",
    "TensorInfo",
    "check_inputs",
    "choose_encoding",
    "decode_indices",
    "encode_indices",
    "encoded_nbytes",
    "file_sha256",
    "load_delta",
    "load_patch",
    "load_quantized",
    "read_header",
    "save_delta",
    "validate_file",
]
