"""Runs one fuzz target under atheris: python fuzz/run.py NAME [libFuzzer options and corpus dirs]."""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["meshca"]):
    import targets  # the meshca modules it imports are instrumented for coverage


def main() -> None:
    name = sys.argv.pop(1)
    if name not in targets.TARGETS:
        sys.exit(f"unknown target {name!r}; targets: {', '.join(targets.TARGETS)}")

    def one(data: bytes) -> None:
        targets.run_one(name, data)

    atheris.Setup(sys.argv, one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
