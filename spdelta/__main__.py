"""``python -m spdelta ...`` is ``spdelta ...`` (handy under ``torchrun -m spdelta``)."""

from spdelta.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
