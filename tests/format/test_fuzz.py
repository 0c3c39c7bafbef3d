"""Fuzzing: flipped, truncated and spliced bytes of valid files only ever raise SpdeltaError."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spdelta.errors import ParameterError, SpdeltaError
from spdelta.format import Problem, load_delta, validate_file
from spdelta.patch import load_patch

VALID = Path(__file__).resolve().parents[2] / "spec" / "vectors" / "valid"
SEEDS = [p.read_bytes() for p in sorted(VALID.glob("*.safetensors"))]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid vector with bytes flipped, set, truncated, deleted, inserted or spliced."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(
            st.sampled_from(["flip", "data", "set", "truncate", "delete", "insert", "splice"])
        )
        n = len(data)
        pos = draw(st.integers(0, max(n - 1, 0)))
        start = 8 + int.from_bytes(data[:8], "little")
        if op == "data" and start < n:  # reach the data rules V7-V10 past an intact header
            data[draw(st.integers(start, n - 1))] ^= 1 << draw(st.integers(0, 7))
        elif op == "flip" and n:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and n:
            data[pos] = draw(
                st.sampled_from(
                    [0, 1, 0x20, 0x22, 0x2C, 0x30, 0x39, 0x5B, 0x7B, 0x7D, 0x7F, 0x80, 0xFF]
                )
            )
        elif op == "truncate":
            del data[pos:]
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 16))]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "splice":
            other = draw(st.sampled_from(SEEDS))
            data = data[:pos] + other[draw(st.integers(0, len(other))) :]
    return bytes(data)


@pytest.mark.slow
@settings(max_examples=2500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.one_of(mutated(), st.binary(max_size=64)))
def test_only_spdelta_errors_escape(data: bytes, tmp_path_factory: pytest.TempPathFactory) -> None:
    path = tmp_path_factory.getbasetemp() / "fuzz.safetensors"
    path.write_bytes(data)
    problems = validate_file(path)
    assert all(isinstance(p, Problem) for p in problems)
    try:
        load_delta(path)
    except ParameterError as e:  # a valid patch (format 1.3): load_delta points to load_patch
        assert problems == [] and "replacement tensor" in str(e)
        load_patch(path)
    except SpdeltaError as e:
        assert problems and type(e).__name__ == problems[0].error
    else:
        assert problems == []
