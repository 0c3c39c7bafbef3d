"""Generate the spdelta format test vectors of ``spec/format.md`` §10, deterministically.

Usage:
    python tools/gen_vectors.py                # (re)write spec/vectors/
    python tools/gen_vectors.py --out DIR      # write elsewhere
    python tools/gen_vectors.py --check        # exit 1 if spec/vectors/ differs from a fresh run

Files are built byte by byte here (not with ``save_delta``), so the vectors are a second,
independent implementation of the writer; ``canonical`` vectors must also equal what
``save_delta`` writes for their decoding.
"""

from __future__ import annotations

import argparse
import filecmp
import hashlib
import json
import math
import shutil
import struct
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from spdelta.format._container import encode_header
from spdelta.format.codec import encode_indices
from spdelta.format.constants import INDEX_DTYPES, TORCH_DTYPES

ROOT = Path(__file__).resolve().parent.parent
SUBDIRS = ("valid", "invalid", "fingerprint")
DEFAULT_OUT = ROOT / "spec" / "vectors"
PRODUCER = "spdelta gen_vectors"
#: (name, safetensors dtype, shape, raw bytes) in data order.
Part = tuple[str, str, list[int], bytes]
#: name -> (shape, indices, values, value dtype, index encoding).
Entry = tuple[list[int], list[int], list[float], str, str]


def tensor_bytes(t: torch.Tensor) -> bytes:
    """Little-endian bytes of a CPU tensor."""
    return t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""


def raw_file(meta: dict[str, str] | None, parts: list[Part], *, pad: int = 0) -> bytes:
    """A safetensors file with ``parts`` stored in list order and ``pad`` extra header spaces."""
    header = encode_header(meta or {}, [(n, dt, s, len(b)) for n, dt, s, b in parts])
    if pad:
        body = header[8:] + b" " * pad
        header = struct.pack("<Q", len(body)) + body
    return header + b"".join(b for *_, b in parts)


def spec_json(specs: dict[str, dict[str, Any]]) -> str:
    return json.dumps(specs, sort_keys=True, separators=(",", ":"))


def entry_parts(entries: dict[str, Entry]) -> tuple[list[Part], dict[str, dict[str, Any]]]:
    """Stored tensors in canonical order (item size descending, then name) and specs."""
    parts: list[Part] = []
    specs: dict[str, dict[str, Any]] = {}
    for name, (shape, indices, values, vdtype, enc) in entries.items():
        codes = encode_indices(torch.tensor(indices, dtype=torch.int64), enc)
        vals = torch.tensor(values, dtype=torch.float64).to(TORCH_DTYPES[vdtype])
        parts.append((f"{name}::idx", INDEX_DTYPES[enc], [codes.numel()], tensor_bytes(codes)))
        parts.append((f"{name}::val", vdtype, [vals.numel()], tensor_bytes(vals)))
        specs[name] = {
            "index_encoding": enc,
            "nnz": len(indices),
            "shape": shape,
            "value_encoding": "raw",
        }
    size = {"U8": 1, "U16": 2, "I32": 4, "I64": 8, "F16": 2, "BF16": 2, "F32": 4, "F64": 8}
    parts.sort(key=lambda p: (-size[p[1]], p[0]))
    return parts, specs


def delta_file(
    entries: dict[str, Entry], extra: dict[str, str] | None = None, version: str = "1.0", **kw: Any
) -> tuple[bytes, dict[str, str]]:
    """A spdelta file for ``entries`` and its full metadata."""
    parts, specs = entry_parts(entries)
    meta = {
        "spdelta.format_version": version,
        "spdelta.producer": PRODUCER,
        "spdelta.tensors": spec_json(specs),
        **(extra or {}),
    }
    return raw_file(meta, parts, **kw), meta


# ------------------------------------------------------- quantized (format 1.1)
#: name -> (shape, indices, codes, scales, value encoding, index encoding, block size).
QEntry = tuple[list[int], list[int], list[int], list[float], str, str, int]


def pack_nibbles(codes: list[int]) -> bytes:
    """int4 codes two per byte, low nibble first, two's complement nibbles (spec §6.3)."""
    nibbles = [c & 0xF for c in codes] + [0] * (len(codes) % 2)
    return bytes(lo | (hi << 4) for lo, hi in zip(nibbles[0::2], nibbles[1::2], strict=True))


def q_parts(entries: dict[str, QEntry]) -> tuple[list[Part], dict[str, dict[str, Any]]]:
    """Stored tensors (canonical order) and specs of quantized entries."""
    parts: list[Part] = []
    specs: dict[str, dict[str, Any]] = {}
    for name, (shape, indices, codes, scales, venc, enc, block) in entries.items():
        idx = encode_indices(torch.tensor(indices, dtype=torch.int64), enc)
        parts.append((f"{name}::idx", INDEX_DTYPES[enc], [idx.numel()], tensor_bytes(idx)))
        if venc == "int8":
            parts.append(
                (f"{name}::val", "I8", [len(codes)], struct.pack(f"<{len(codes)}b", *codes))
            )
        else:
            packed = pack_nibbles(codes)
            parts.append((f"{name}::val", "U8", [len(packed)], packed))
        scale = struct.pack(f"<{len(scales)}f", *scales)
        parts.append((f"{name}::scale", "F32", [len(scales)], scale))
        specs[name] = {
            "block_size": block,
            "index_encoding": enc,
            "nnz": len(indices),
            "shape": shape,
            "value_encoding": venc,
        }
    size = {"U8": 1, "I8": 1, "U16": 2, "I32": 4, "I64": 8, "F32": 4}
    parts.sort(key=lambda p: (-size[p[1]], p[0]))
    return parts, specs


def q_file(
    entries: dict[str, QEntry],
    change: Callable[[list[Part], dict[str, Any]], object] | None = None,
    version: str = "1.1",
) -> bytes:
    """A format 1.1 file of quantized entries, optionally broken by ``change``."""
    parts, specs = q_parts(entries)
    if change is not None:
        change(parts, specs)
    meta = {
        "spdelta.format_version": version,
        "spdelta.producer": PRODUCER,
        "spdelta.tensors": spec_json(specs),
    }
    return raw_file(meta, parts)


def dequantized(codes: list[int], scales: list[float], block: int) -> list[float]:
    """``code * scale`` rounded to float32, as a reader computes it."""
    q = torch.tensor(codes, dtype=torch.float32)
    s = torch.tensor(scales, dtype=torch.float32).repeat_interleave(block)[: len(codes)]
    return (q * s).double().tolist()


Q8: dict[str, QEntry] = {
    "w": (
        [10, 10],
        [0, 3, 7, 20, 21, 50, 99],
        [127, -64, 0, 5, -127, 1, 100],
        [0.5, 0.25, 0.0078125],
        "int8",
        "gap8",
        3,
    )
}
Q4: dict[str, QEntry] = {
    "w": ([3, 5], [1, 2, 4, 8, 14], [7, -7, -1, 3, 0], [1.0, 0.5, 2.0], "int4", "abs32", 2)
}
VALID_Q: dict[str, tuple[str, dict[str, QEntry]]] = {
    "int8_blocks": ("format 1.1: int8 codes, 3 per block (last block partial), f32 scales", Q8),
    "int4_odd": ("format 1.1: int4 codes packed two per byte, odd nnz, abs32 indices", Q4),
}


def build_valid_q(case: str) -> tuple[bytes, dict[str, Any]]:
    description, entries = VALID_Q[case]
    data = q_file(entries)
    parts, specs = q_parts(entries)
    meta = {
        "spdelta.format_version": "1.1",
        "spdelta.producer": PRODUCER,
        "spdelta.tensors": spec_json(specs),
    }
    tensors = {
        name: {
            "shape": shape,
            "nnz": len(indices),
            "index_encoding": enc,
            "value_encoding": venc,
            "value_dtype": "I8" if venc == "int8" else "U8",
            "block_size": block,
            "codes": codes,
            "scales": scales,
            "indices": indices,
            "values": dequantized(codes, scales, block),
        }
        for name, (shape, indices, codes, scales, venc, enc, block) in entries.items()
    }
    return data, {
        "description": description,
        "canonical": True,
        "metadata": dict(sorted(meta.items())),
        "tensors": tensors,
    }


# ---------------------------------------------------------------- valid vectors
W = "model.layers.0.mlp.up_proj.weight"
# fmt: off
VALID: dict[str, tuple[str, dict[str, Entry], dict[str, Any]]] = {
    "gap8_f32": ("gap8 codes with escapes (gaps of 255, 256 and 510), f32 values", {
        "w": ([4, 300], [0, 255, 511, 1021, 1199], [0.5, -1.25, 3.0, 1024.0, -0.0078125],
              "F32", "gap8")}, {}),
    "gap16_bf16": ("gap16 codes with one escape (gap 69998), bf16 values", {
        "w": ([300, 300], [0, 2, 70000, 89999], [1.0, -2.0, 0.375, -65536.0], "BF16", "gap16")},
        {}),
    "abs32_f16": ("abs32 indices, f16 values", {
        "w": ([8, 8], [3, 9, 63], [0.25, -3.5, 65504.0], "F16", "abs32")}, {}),
    "abs64_f64": ("abs64 indices, f64 values", {
        "bias": ([5], [0, 4], [0.1, -1e300], "F64", "abs64")}, {}),
    "mixed": ("several tensors with every encoding and value dtype", {
        W: ([6, 4], [0, 5, 23], [1.5, -0.5, 2.0], "BF16", "gap8"),
        "model.embed_tokens.weight": ([10, 3], [7, 8, 29], [-1.0, 0.0625, 4.0], "F16", "gap16"),
        "lm_head.weight": ([3, 3], [2, 6], [0.75, -8.0], "F32", "abs32"),
        "model.norm.weight": ([3], [1], [-0.125], "F64", "abs64")}, {}),
    "empty_delta": ("no tensors at all", {}, {}),
    "empty_tensor": ("a tensor with nnz 0 (zero-byte stored tensors)", {
        "w": ([3, 4], [], [], "F32", "gap8")}, {}),
    "scalar": ("a 0-d tensor (shape [], numel 1) fully covered", {
        "s": ([], [0], [-2.5], "F32", "gap8")}, {}),
    "numel_one": ("shape [1, 1] fully covered, abs64", {
        "w": ([1, 1], [0], [7.0], "F32", "abs64")}, {}),
    "density_one": ("every entry of a [2, 3] tensor", {
        "w": ([2, 3], [0, 1, 2, 3, 4, 5], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0], "BF16", "gap8")}, {}),
    "huge_shapes": ("tensors of more than 2**31 elements declared by shape only", {
        "big64": ([65536, 65536], [0, 2**32 - 2, 2**32 - 1], [1.0, 2.0, -3.0], "F32", "abs64"),
        "big_gap": ([2**31 + 1], [0, 5], [0.5, 0.25], "BF16", "gap8"),
        "edge32": ([2**31], [2**31 - 1], [1.0], "F16", "abs32")}, {}),
    "metadata_full": ("every optional metadata key, an extension key and user keys", {
        "w": ([4], [2], [1.0], "F32", "gap8")}, {"extra": {
            "spdelta.base_model": "HuggingFaceTB/SmolLM2-135M-Instruct",
            "spdelta.base_model.revision": "12fd25f77366fa6b3b4b768ec3050bf629380bac",
            "spdelta.base_model.fingerprint": "sha256:" + "0" * 64,
            "spdelta.provenance": '{"command":"spdelta compose a b","inputs":["a","b"]}',
            "spdelta.training": '{"density":0.01,"method":"speft"}',
            "spdelta.ext.note": "extensions are ignored by readers",
            "task": "sentiment", "note.unicode": "délta ✓"}}),
    "newer_minor": ("format 1.7 with unknown spdelta.* keys, spdelta.ext.* and a new per-tensor "
                    "key: a 1.0 reader reads it, ignoring them", {
        "w": ([4], [1, 3], [1.0, -1.0], "F32", "gap8")}, {
            "version": "1.7", "extra": {"spdelta.ext.future": "x", "spdelta.future_key": "y"},
            "tensor_extra": {"w": {"checksum": "abc"}}}),
    "base_mismatch": ("format 1.2: a merge made with --allow-base-mismatch records the "
                      "base fingerprints it overrode", {
        "w": ([4], [2], [1.0], "F32", "gap8")}, {"version": "1.2", "canonical": True, "extra": {
            "spdelta.base_model": "org/base",
            "spdelta.base_model.mismatch": '{"spdelta.base_model.fingerprint":{"a.st":"base1:'
            + "0" * 32 + '","b.st":"base1:' + "1" * 32 + '"}}'}}),
    "padded_header": ("the header carries 16 extra padding spaces", {
        "w": ([4], [0], [1.0], "F32", "gap8")}, {"pad": 16}),
    "noncanonical_order": ("stored tensors in another order than save_delta's (any is valid)", {
        "a": ([4], [0], [1.0], "F16", "gap8"), "b": ([4], [3], [2.0], "F64", "abs64")},
        {"reverse": True}),
}
# fmt: on


def build_valid(case: str) -> tuple[bytes, dict[str, Any]]:
    description, entries, opts = VALID[case]
    parts, specs = entry_parts(entries)
    for name, more in opts.get("tensor_extra", {}).items():
        specs[name].update(more)
    if opts.get("reverse"):
        parts.reverse()
    meta = {
        "spdelta.format_version": opts.get("version", "1.0"),
        "spdelta.producer": PRODUCER,
        "spdelta.tensors": spec_json(specs),
        **opts.get("extra", {}),
    }
    data = raw_file(meta, parts, pad=opts.get("pad", 0))
    canonical = opts.get("canonical", not (set(opts) & {"version", "tensor_extra", "pad",
                                                         "reverse"}))
    tensors = {}
    for name, (shape, indices, values, vdtype, enc) in entries.items():
        exact = torch.tensor(values, dtype=torch.float64).to(TORCH_DTYPES[vdtype]).double()
        tensors[name] = {
            "shape": shape,
            "nnz": len(indices),
            "index_encoding": enc,
            "value_dtype": vdtype,
            "indices": indices,
            "values": exact.tolist(),
        }
    return data, {
        "description": description,
        "canonical": canonical,
        "metadata": dict(sorted(meta.items())),
        "tensors": dict(sorted(tensors.items())),
    }


# -------------------------------------------------------------- invalid vectors
ONE: dict[str, Entry] = {"w": ([4, 4], [1, 6], [1.0, -1.0], "F32", "gap8")}


def _swap(entries: dict[str, Entry], name: str, **kw: Any) -> dict[str, Entry]:
    shape, idx, val, vdt, enc = entries[name]
    new: dict[str, Any] = dict(shape=shape, idx=idx, val=val, vdt=vdt, enc=enc) | kw
    return {**entries, name: (new["shape"], new["idx"], new["val"], new["vdt"], new["enc"])}


def _with_meta(
    change: Callable[[dict[str, str]], object], entries: dict[str, Entry] = ONE
) -> bytes:
    parts, specs = entry_parts(entries)
    meta = {
        "spdelta.format_version": "1.0",
        "spdelta.producer": PRODUCER,
        "spdelta.tensors": spec_json(specs),
    }
    change(meta)
    return raw_file(meta, parts)


def _with_parts(
    change: Callable[[list[Part], dict[str, Any]], object], entries: dict[str, Entry] = ONE
) -> bytes:
    parts, specs = entry_parts(entries)
    change(parts, specs)
    meta = {
        "spdelta.format_version": "1.0",
        "spdelta.producer": PRODUCER,
        "spdelta.tensors": spec_json(specs),
    }
    return raw_file(meta, parts)


def _replace(parts: list[Part], name: str, dtype: str, shape: list[int], data: bytes) -> None:
    i = [p[0] for p in parts].index(name)
    parts[i] = (name, dtype, shape, data)


def _header(text: bytes, data: bytes = b"") -> bytes:
    return struct.pack("<Q", len(text)) + text + data


def _valid_one() -> bytes:
    return delta_file(ONE)[0]


def _random(n: int) -> bytes:
    out, block = b"", b"spdelta vectors"
    while len(out) < n:
        block = hashlib.sha256(block).digest()
        out += block
    return out[:n]


# fmt: off
_T = '{"__metadata__":{"spdelta.format_version":"1.0","spdelta.tensors":"{}"},'
_ONE_F32 = b"\x00\x00\x80\x3f"
INVALID: dict[str, tuple[str, str, Callable[[], bytes]]] = {
    "v1_empty_file": ("V1", "an empty file", lambda: b""),
    "v1_short_file": ("V1", "5 bytes, fewer than the 8-byte length",
                      lambda: b"\x02\x00\x00\x00\x00"),
    "v1_header_beyond_file": ("V1", "declared header length past the end of the file",
                              lambda: struct.pack("<Q", 4096) + b"{}      "),
    "v1_header_over_limit": ("V1", "declared header length of 200 MB (limit 100 MB)",
                             lambda: struct.pack("<Q", 200_000_000) + b"{}      "),
    "v1_garbage_header": ("V1", "a header that is not JSON",
                          lambda: _header(b"{not json at all}")),
    "v1_leading_space": ("V1", "a header that starts with a space, not '{'",
                         lambda: _header(b' {"__metadata__":{}}    ')),
    "v1_not_utf8": ("V1", "a header that is not UTF-8", lambda: _header(b'{"\xff":1}      ')),
    "v1_random_bytes": ("V1", "64 pseudo-random bytes", lambda: _random(64)),
    "v1_truncated": ("V1", "a valid file with its last 3 bytes cut",
                     lambda: _valid_one()[:-3]),
    "v1_trailing_bytes": ("V1", "4 bytes after the last tensor",
                          lambda: _valid_one() + b"\x00" * 4),
    "v1_hole": ("V1", "a 4-byte hole between two tensors", lambda: _header(
        (_T + '"w::idx":{"dtype":"U8","shape":[0],"data_offsets":[4,4]}}').encode(),
        b"\x00" * 4)),
    "v1_size_mismatch": ("V1", "a tensor whose bytes do not match dtype and shape",
                         lambda: _header((_T + '"w::val":{"dtype":"F32","shape":[2],'
                                          '"data_offsets":[0,4]}}').encode(), b"\x00" * 4)),
    "v1_unknown_dtype": ("V1", "a tensor of unknown dtype 'Q8'", lambda: _header(
        (_T + '"w::val":{"dtype":"Q8","shape":[1],"data_offsets":[0,1]}}').encode(), b"\x00")),
    "v1_duplicate_key": ("V1", "a header with a duplicated JSON key", lambda: _header(
        b'{"__metadata__":{"a":"1"},"__metadata__":{"a":"2"}}')),
    "v1_metadata_not_str": ("V1", "__metadata__ holding a number", lambda: _header(
        b'{"__metadata__":{"spdelta.format_version":1.0}}')),
    "v2_no_metadata": ("V2", "a plain safetensors file without metadata",
                       lambda: raw_file(None, [("w", "F32", [1], _ONE_F32)])),
    "v2_no_version": ("V2", "metadata without spdelta.format_version",
                      lambda: raw_file({"spdelta.tensors": "{}"}, [])),
    "v3_major_2": ("V3", "format_version 2.0 (unknown MAJOR)",
                   lambda: _with_meta(lambda m: m.update({"spdelta.format_version": "2.0"}))),
    "v3_malformed": ("V3", "format_version '1' (not MAJOR.MINOR)",
                     lambda: _with_meta(lambda m: m.update({"spdelta.format_version": "1"}))),
    "v4_tensors_missing": ("V4", "no spdelta.tensors key",
                           lambda: raw_file({"spdelta.format_version": "1.0"}, [])),
    "v4_tensors_not_json": ("V4", "spdelta.tensors is not JSON",
                            lambda: _with_meta(lambda m: m.update({"spdelta.tensors": "{w:"}))),
    "v4_unknown_encoding": ("V4", "index_encoding 'gap4'", lambda: _with_parts(
        lambda p, s: s["w"].update({"index_encoding": "gap4"}))),
    "v4_negative_shape": ("V4", "shape [-4, 4]", lambda: _with_parts(
        lambda p, s: s["w"].update({"shape": [-4, 4]}))),
    "v4_unknown_reserved_key": ("V4", "unknown key spdelta.colour in a 1.0 file",
                                lambda: _with_meta(lambda m: m.update({"spdelta.colour": "red"}))),
    "v4_provenance_not_object": ("V4", "spdelta.provenance is a JSON list", lambda: _with_meta(
        lambda m: m.update({"spdelta.provenance": "[1]"}))),
    "v4_mismatch_in_1_1": ("V4", "spdelta.base_model.mismatch (defined in 1.2) in a 1.1 file",
                           lambda: _with_meta(lambda m: m.update({
                               "spdelta.format_version": "1.1",
                               "spdelta.base_model.mismatch": "{}"}))),
    "v4_mismatch_not_object": ("V4", "spdelta.base_model.mismatch is a JSON string",
                               lambda: _with_meta(lambda m: m.update({
                                   "spdelta.format_version": "1.2",
                                   "spdelta.base_model.mismatch": '"a.st"'}))),
    "v5_missing_val": ("V5", "w::val is missing", lambda: _with_parts(
        lambda p, s: p.pop([x[0] for x in p].index("w::val")))),
    "v5_stray_tensor": ("V5", "an undeclared tensor 'extra'", lambda: _with_parts(
        lambda p, s: p.append(("extra", "U8", [1], b"\x00")))),
    "v5_separator_in_name": ("V5", "a tensor named 'a::b'", lambda: delta_file(
        {"a::b": ([4], [0], [1.0], "F32", "gap8")})[0]),
    "v6_idx_dtype": ("V6", "gap8 indices stored as U16", lambda: _with_parts(
        lambda p, s: _replace(p, "w::idx", "U16", [2], b"\x02\x00\x05\x00"))),
    "v6_val_int": ("V6", "values stored as I32", lambda: _with_parts(
        lambda p, s: _replace(p, "w::val", "I32", [2], b"\x01\x00\x00\x00\x02\x00\x00\x00"))),
    "v6_val_2d": ("V6", "values of shape [2, 1]", lambda: _with_parts(
        lambda p, s: _replace(p, "w::val", "F32", [2, 1], _ONE_F32 * 2))),
    "v7_val_length": ("V7", "nnz 2 but 3 values", lambda: _with_parts(
        lambda p, s: _replace(p, "w::val", "F32", [3], _ONE_F32 * 3))),
    "v7_abs_length": ("V7", "abs32 with nnz 2 but 1 index", lambda: _with_parts(
        lambda p, s: _replace(p, "w::idx", "I32", [1], b"\x01\x00\x00\x00"),
        _swap(ONE, "w", enc="abs32"))),
    "v7_gap_trailing_escape": ("V7", "a gap8 stream ending with an escape code",
                               lambda: _with_parts(
        lambda p, s: _replace(p, "w::idx", "U8", [3], b"\x02\x05\x00"))),
    "v7_gap_count": ("V7", "a gap8 stream with 3 non-zero codes for nnz 2", lambda: _with_parts(
        lambda p, s: _replace(p, "w::idx", "U8", [3], b"\x02\x05\x01"))),
    "v8_abs_out_of_range": ("V8", "abs32 index 16 in a [4, 4] tensor", lambda: delta_file(
        _swap(ONE, "w", idx=[1, 16], enc="abs32"))[0]),
    "v8_abs_negative": ("V8", "abs64 index -1", lambda: delta_file(
        _swap(ONE, "w", idx=[-1, 3], enc="abs64"))[0]),
    "v8_gap_out_of_range": ("V8", "gap8 codes decoding past numel", lambda: _with_parts(
        lambda p, s: _replace(p, "w::idx", "U8", [2], b"\x02\xff"))),
    "v8_abs32_huge": ("V8", "abs32 for a tensor of 2**31 + 1 elements", lambda: delta_file(
        _swap(ONE, "w", shape=[2**31 + 1], enc="abs32"))[0]),
    "v9_unsorted": ("V9", "abs32 indices [6, 1]", lambda: delta_file(
        _swap(ONE, "w", idx=[6, 1], enc="abs32"))[0]),
    "v9_duplicate": ("V9", "abs64 indices [3, 3]", lambda: delta_file(
        _swap(ONE, "w", idx=[3, 3], enc="abs64"))[0]),
    "v10_nan": ("V10", "a NaN value", lambda: delta_file(
        _swap(ONE, "w", val=[1.0, float("nan")]))[0]),
    "v10_inf": ("V10", "an infinite bf16 value", lambda: delta_file(
        _swap(ONE, "w", val=[float("-inf"), 1.0], vdt="BF16"))[0]),
}
# fmt: on


def _q_swap(parts: list[Part], name: str, dtype: str, shape: list[int], data: bytes) -> None:
    _replace(parts, name, dtype, shape, data)


# fmt: off
INVALID.update({
    "v4_block_size_missing": ("V4", "an int8 tensor without block_size", lambda: q_file(
        Q8, lambda p, s: s["w"].pop("block_size"))),
    "v4_block_size_zero": ("V4", "an int4 tensor with block_size 0", lambda: q_file(
        Q4, lambda p, s: s["w"].update({"block_size": 0}))),
    "v4_quantized_in_1_0": ("V4", "value_encoding int8 in a file labelled 1.0",
                            lambda: q_file(Q8, version="1.0")),
    "v5_missing_scale": ("V5", "an int8 tensor without w::scale", lambda: q_file(
        Q8, lambda p, s: p.pop([x[0] for x in p].index("w::scale")))),
    "v5_scale_on_raw": ("V5", "a raw tensor with a w::scale tensor", lambda: _with_parts(
        lambda p, s: p.append(("w::scale", "F32", [1], _ONE_F32)))),
    "v6_scale_dtype": ("V6", "scales stored as F16", lambda: q_file(
        Q8, lambda p, s: _q_swap(p, "w::scale", "F16", [3], b"\x00\x38" * 3))),
    "v6_int8_codes_u8": ("V6", "int8 codes stored as U8", lambda: q_file(
        Q8, lambda p, s: _q_swap(p, "w::val", "U8", [7], bytes(7)))),
    "v7_scale_count": ("V7", "7 int8 entries, block_size 3, but 2 scales", lambda: q_file(
        Q8, lambda p, s: _q_swap(p, "w::scale", "F32", [2], struct.pack("<2f", 0.5, 0.25)))),
    "v7_int4_codes_length": ("V7", "5 int4 entries in 2 bytes (3 needed)", lambda: q_file(
        Q4, lambda p, s: _q_swap(p, "w::val", "U8", [2], b"\x97\x3f"))),
    "v7_int4_padding": ("V7", "odd nnz with a non-zero padding nibble", lambda: q_file(
        Q4, lambda p, s: _q_swap(p, "w::val", "U8", [3], b"\x97\x3f\x10"))),
    "v10_reserved_code": ("V10", "int8 code -128 (reserved)", lambda: q_file(
        {"w": (*Q8["w"][:2], [-128, *Q8["w"][2][1:]], *Q8["w"][3:])})),
    "v10_scale_nan": ("V10", "a NaN scale", lambda: q_file(
        {"w": (*Q4["w"][:3], [1.0, float("nan"), 2.0], *Q4["w"][4:])})),
    "v10_scale_negative": ("V10", "a negative scale", lambda: q_file(
        {"w": (*Q4["w"][:3], [1.0, -0.5, 2.0], *Q4["w"][4:])})),
})
# fmt: on


# ------------------------------------------------- replacement tensors (format 1.3)
#: name -> (shape, indices, stored dtype, bits of each value as an unsigned int, index encoding).
REntry = tuple[list[int], list[int], str, list[int], str]
#: Bytes per element of every dtype a replacement tensor may store (spec §4).
R_SIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "U16": 2,
          "I16": 2, "F16": 2, "BF16": 2, "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8,
          "F64": 8, "C64": 8}
BASE_FP, RESULT_FP = "base1:" + "ab" * 16, "base1:" + "cd" * 16


def r_parts(entries: dict[str, REntry]) -> tuple[list[Part], dict[str, dict[str, Any]]]:
    """Stored tensors (unsorted) and specs of replacement entries: values written bit by bit."""
    parts: list[Part] = []
    specs: dict[str, dict[str, Any]] = {}
    for name, (shape, indices, dtype, bits, enc) in entries.items():
        codes = encode_indices(torch.tensor(indices, dtype=torch.int64), enc)
        data = b"".join(b.to_bytes(R_SIZE[dtype], "little") for b in bits)
        parts.append((f"{name}::idx", INDEX_DTYPES[enc], [codes.numel()], tensor_bytes(codes)))
        parts.append((f"{name}::val", dtype, [len(bits)], data))
        specs[name] = {"index_encoding": enc, "nnz": len(indices), "shape": shape,
                       "value_encoding": "replace"}
    return parts, specs


def canonical_order(parts: list[Part]) -> list[Part]:
    """Item size descending, then name (the order save_delta writes)."""
    return sorted(parts, key=lambda p: (-R_SIZE[p[1]], p[0]))


def r_file(entries: dict[str, REntry], raw: dict[str, Entry] | None = None,
           change: Callable[[list[Part], dict[str, Any], dict[str, str]], object] | None = None,
           version: str = "1.3") -> tuple[bytes, dict[str, str]]:
    """A format 1.3 file of replacement (and raw) entries, optionally broken by ``change``."""
    parts, specs = r_parts(entries)
    more, raw_specs = entry_parts(raw or {})
    parts, specs = canonical_order(parts + more), {**specs, **raw_specs}
    meta = {"spdelta.base_model.fingerprint": BASE_FP, "spdelta.result.fingerprint": RESULT_FP,
            "spdelta.format_version": version, "spdelta.producer": PRODUCER}
    if change is not None:
        change(parts, specs, meta)
    meta["spdelta.tensors"] = spec_json(specs)
    return raw_file(meta, parts), meta


# fmt: off
#: Values whose bits an arithmetic path would change: NaN payloads, -0.0, subnormals, inf.
R_DTYPES: dict[str, REntry] = {
    "bf16.specials": ([3, 4], [0, 1, 2, 3, 5, 7, 11], "BF16",
                      [0x7FC1, 0xFF81, 0x8000, 0x0001, 0x7F80, 0xFF80, 0x3F80], "gap8"),
    "f32.specials": ([5], [0, 2, 4], "F32", [0x7F800001, 0x80000000, 0x00000001], "gap8"),
    "f16.specials": ([4], [1, 3], "F16", [0x7E01, 0x8001], "gap8"),
    "f64.nan": ([2], [1], "F64", [0x7FF0000000000001], "gap8"),
    "c64.z": ([2], [1], "C64", [0x800000003F800000], "gap8"),
    "i64.step": ([], [0], "I64", [2**64 - 1], "gap8"),
    "i32.ids": ([6], [0, 5], "I32", [0x80000000, 7], "gap8"),
    "u16.none": ([3], [], "U16", [], "gap8"),
    "i8.code": ([3], [1], "I8", [0x80], "gap8"),
    "u8.far": ([300], [0, 299], "U8", [255, 0], "gap8"),
    "bool.mask": ([4], [2], "BOOL", [1], "gap8"),
    "f8.e4m3": ([2], [0], "F8_E4M3", [0x7F], "gap8"),
}
R_ENCODINGS: dict[str, REntry] = {
    "a": ([70000], [0, 69999], "BF16", [0x7FC1, 0x8000], "gap16"),
    "b": ([6], [1, 4], "F32", [0xFF800000, 0x00000001], "abs32"),
    "c": ([2, 2], [3], "I64", [5], "abs64"),
}
VALID_R: dict[str, tuple[str, dict[str, REntry], dict[str, Entry]]] = {
    "replace_dtypes": ("format 1.3: replacement tensors in many dtypes holding NaN payloads, "
                       "-0.0, subnormals, infinities and extreme integers; base and result "
                       "fingerprints", R_DTYPES, {}),
    "replace_encodings": ("format 1.3: replacement tensors with gap16, abs32 and abs64 indices",
                          R_ENCODINGS, {}),
    "patch_mixed": ("format 1.3: a replacement tensor beside an additive (raw) one", {
        "model.norm.weight": ([8], [0, 7], "BF16", [0x7FC1, 0x8000], "gap8")}, {
        W: ([4, 4], [3, 9], [0.5, -0.25], "F32", "gap8")}),
}
# fmt: on


def build_valid_r(case: str) -> tuple[bytes, dict[str, Any]]:
    description, entries, raw = VALID_R[case]
    data, meta = r_file(entries, raw)
    tensors: dict[str, Any] = {
        name: {"shape": shape, "nnz": len(indices), "index_encoding": enc,
               "value_encoding": "replace", "value_dtype": dtype, "indices": indices, "bits": bits}
        for name, (shape, indices, dtype, bits, enc) in entries.items()}
    for name, (shape, indices, values, vdtype, enc) in raw.items():
        tensors[name] = {"shape": shape, "nnz": len(indices), "index_encoding": enc,
                         "value_dtype": vdtype, "indices": indices, "values": values}
    return data, {"description": description, "canonical": True,
                  "metadata": dict(sorted(meta.items())), "tensors": dict(sorted(tensors.items()))}


R_ONE: dict[str, REntry] = {"w": ([4, 4], [1, 6], "BF16", [0x7FC1, 0x8000], "gap8")}


def _r_invalid(change: Callable[[list[Part], dict[str, Any], dict[str, str]], object],
               version: str = "1.3") -> bytes:
    return r_file(R_ONE, change=change, version=version)[0]


# fmt: off
INVALID.update({
    "v4_replace_in_1_2": ("V4", "value_encoding replace (defined in 1.3) in a file labelled 1.2",
                          lambda: _r_invalid(lambda p, s, m: m.pop(
                              "spdelta.result.fingerprint"), version="1.2")),
    "v4_replace_block_size": ("V4", "a replacement tensor with a block_size", lambda: _r_invalid(
        lambda p, s, m: s["w"].update({"block_size": 2}))),
    "v4_result_fingerprint_in_1_2": ("V4", "spdelta.result.fingerprint (defined in 1.3) in a "
                                     "1.2 file", lambda: _with_meta(lambda m: m.update({
                                         "spdelta.format_version": "1.2",
                                         "spdelta.result.fingerprint": RESULT_FP}))),
    "v5_scale_on_replace": ("V5", "a replacement tensor with a w::scale tensor",
                            lambda: _r_invalid(lambda p, s, m: p.append(
                                ("w::scale", "F32", [1], _ONE_F32)))),
    "v6_replace_f4": ("V6", "replacement values of the sub-byte dtype F4", lambda: _r_invalid(
        lambda p, s, m: _replace(p, "w::val", "F4", [2], b"\x21"))),
    "v6_replace_2d": ("V6", "replacement values of shape [2, 1]", lambda: _r_invalid(
        lambda p, s, m: _replace(p, "w::val", "BF16", [2, 1], b"\xc1\x7f\x00\x80"))),
    "v7_replace_length": ("V7", "a replacement tensor with nnz 2 but 3 values",
                          lambda: _r_invalid(lambda p, s, m: _replace(
                              p, "w::val", "BF16", [3], b"\xc1\x7f\x00\x80\x00\x00"))),
})
# fmt: on


# ------------------------------------------------- base fingerprints (spec §5.1)
#: safetensors dtype -> bytes per element, for the checkpoints below.
FP_SIZE = {"F32": 4, "BF16": 2, "F16": 2, "F64": 8, "I64": 8, "I32": 4, "I8": 1, "U8": 1,
           "BOOL": 1}
FP_TORCH = {**TORCH_DTYPES, "BOOL": torch.bool}


def fp_record(name: str, dtype: str, shape: list[int], data: bytes) -> bytes:
    """The record of spec §5.1, written out from the rule's text (no library code)."""
    numel = math.prod(shape)
    m = min(1024, numel)
    pos = list(range(m)) if m <= 1 else [i * (numel - 1) // (m - 1) for i in range(m)]
    size = FP_SIZE[dtype]
    head = json.dumps({"dtype": dtype, "name": name, "samples": m, "shape": shape},
                      sort_keys=True, separators=(",", ":"))
    return head.encode("ascii") + b"\n" + b"".join(data[p * size:(p + 1) * size] for p in pos)


def legacy_fingerprint(tensors: dict[str, torch.Tensor], names: list[str]) -> str:
    """The rule of files before 1.2: float32 linspace positions over the delta's tensors."""
    h = hashlib.sha256()
    for n in sorted(names):
        flat = tensors[n].reshape(-1)
        pos = torch.linspace(0, max(flat.numel() - 1, 0), min(1024, flat.numel()),
                             dtype=torch.float32).long()
        h.update(f"{n}:{list(tensors[n].shape)}:".encode() + flat[pos].float().numpy().tobytes())
    return "sha256:" + h.hexdigest()[:16]


def _pattern(dtype: str, n: int, seed: int) -> bytes:
    """``n`` deterministic elements: finite multiples of 1/64 for floats, any ints, 0/1 bools."""
    i = torch.arange(n, dtype=torch.int64)
    if dtype == "BOOL":
        return tensor_bytes((i + seed) % 2 == 1)
    if dtype in ("F32", "BF16", "F16", "F64"):
        values = ((i * 37 + seed) % 201 - 100).double() / 64
        return tensor_bytes(values.to(FP_TORCH[dtype]))
    return tensor_bytes(((i * 131 + seed * 17) % 251 - 120).to(FP_TORCH[dtype]))


# name -> (dtype, shape); each checkpoint is one safetensors file without metadata.
# fmt: off
FINGERPRINT: dict[str, tuple[str, dict[str, tuple[str, list[int]]]]] = {
    "dtypes": ("one small tensor of each common dtype, a scalar, an empty tensor and a "
               "non-ASCII name; every element sampled", {
        "model.embed_tokens.weight": ("BF16", [6, 4]), "model.norm.weight": ("F32", [4]),
        "lm_head.bias": ("F16", [3]), "x.f64": ("F64", [2, 1]), "x.i64": ("I64", [2]),
        "x.i32": ("I32", []), "x.i8": ("I8", [3]), "x.u8": ("U8", [0, 5]),
        "x.bool": ("BOOL", [2]), "w\u00e9ight": ("F32", [1])}),
    "sampled": ("tensors of more than 1,024 elements: positions floor(i * (n - 1) / 1023)", {
        "layers.0.mlp.up_proj.weight": ("BF16", [3, 1031]), "layers.0.bias": ("F32", [1025]),
        "layers.1.weight": ("F16", [3, 2, 350])}),
}
# fmt: on


def build_fingerprint(case: str) -> tuple[bytes, dict[str, Any]]:
    description, spec = FINGERPRINT[case]
    parts: list[Part] = []
    for seed, (name, (dtype, shape)) in enumerate(sorted(spec.items())):
        parts.append((name, dtype, shape, _pattern(dtype, math.prod(shape), seed)))
    data = raw_file(None, parts)
    records = sorted((name, fp_record(name, dt, shape, raw)) for name, dt, shape, raw in parts)
    value = "base1:" + hashlib.sha256(b"".join(r for _, r in records)).hexdigest()[:32]
    floats = {n: torch.frombuffer(bytearray(raw), dtype=TORCH_DTYPES[dt]).reshape(shape)
              for n, dt, shape, raw in parts if dt in ("F32", "BF16", "F16") and raw}
    legacy_names = sorted(floats)[:2]
    return data, {
        "description": description,
        "fingerprint": value,
        "legacy": {"names": legacy_names, "fingerprint": legacy_fingerprint(floats, legacy_names)},
    }


ERRORS = {
    "V1": "ContainerError",
    "V2": "NotSpdeltaError",
    "V3": "VersionError",
    "V4": "MetadataError",
    "V5": "TensorSetError",
    "V6": "DtypeError",
    "V7": "LengthError",
    "V8": "IndexRangeError",
    "V9": "IndexOrderError",
    "V10": "NonFiniteError",
}


def _dump(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


def generate(out: Path) -> None:
    """Write every vector under ``out/valid`` and ``out/invalid`` (replacing those folders)."""
    for sub in SUBDIRS:
        shutil.rmtree(out / sub, ignore_errors=True)
        (out / sub).mkdir(parents=True)
    builders = {**dict.fromkeys(VALID, build_valid), **dict.fromkeys(VALID_Q, build_valid_q),
                **dict.fromkeys(VALID_R, build_valid_r)}
    for case, build_one in builders.items():
        data, expected = build_one(case)
        (out / "valid" / f"{case}.safetensors").write_bytes(data)
        (out / "valid" / f"{case}.json").write_bytes(_dump(expected))
    for case, (rule, description, build) in INVALID.items():
        (out / "invalid" / f"{case}.safetensors").write_bytes(build())
        (out / "invalid" / f"{case}.json").write_bytes(
            _dump({"rule": rule, "error": ERRORS[rule], "description": description})
        )
    for case in FINGERPRINT:
        data, expected = build_fingerprint(case)
        (out / "fingerprint" / f"{case}.safetensors").write_bytes(data)
        (out / "fingerprint" / f"{case}.json").write_bytes(_dump(expected))


def check(committed: Path) -> list[str]:
    """Relative paths that differ between ``committed`` and a fresh generation."""
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        diffs = []
        for sub in SUBDIRS:
            fresh = {p.name for p in (Path(tmp) / sub).iterdir()}
            old = (
                {p.name for p in (committed / sub).iterdir()}
                if (committed / sub).is_dir()
                else set()
            )
            for name in sorted(fresh | old):
                a, b = Path(tmp) / sub / name, committed / sub / name
                if not (a.exists() and b.exists() and filecmp.cmp(a, b, shallow=False)):
                    diffs.append(f"{sub}/{name}")
        return diffs


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="vectors folder")
    parser.add_argument("--check", action="store_true", help="diff against --out, write nothing")
    args = parser.parse_args(argv)
    if args.check:
        diffs = check(args.out)
        for d in diffs:
            print(f"differs: {d}", file=sys.stderr)
        print(
            "vectors up to date"
            if not diffs
            else f"{len(diffs)} vector files differ; run python tools/gen_vectors.py and commit",
            file=sys.stderr,
        )
        return 1 if diffs else 0
    generate(args.out)
    print(
        f"wrote {len(VALID) + len(VALID_Q) + len(VALID_R)} valid and {len(INVALID)} invalid "
        f"vectors to {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
