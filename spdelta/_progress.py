"""Progress bars: ``tqdm`` when it is installed, else a silent stand-in with the same calls.

The library needs only torch and safetensors; ``tqdm`` (installed with the ``train`` and
``hf`` extras) only draws the bars.

Example:
    >>> from spdelta._progress import tqdm
    >>> with tqdm(total=2, disable=True) as bar:
    ...     bar.update(2)
    >>> list(tqdm([1, 2], disable=True))
    [1, 2]
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

__all__ = ["tqdm"]


class _Silent:
    """The calls spdelta makes on a ``tqdm`` bar, doing nothing; iterates its iterable."""

    def __init__(self, iterable: Iterable[Any] | None = None, *args: Any, **kwargs: Any) -> None:
        del args, kwargs
        self._iterable = iterable if iterable is not None else ()

    def __iter__(self) -> Iterator[Any]:
        return iter(self._iterable)

    def __enter__(self) -> _Silent:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def update(self, n: float = 1) -> None:
        """Nothing to advance."""

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        """Nothing to show."""

    def close(self) -> None:
        """Nothing to close."""


try:
    from tqdm.auto import tqdm
except ImportError:  # the core runs without it: bars are silent
    tqdm = _Silent  # type: ignore[assignment,misc]
