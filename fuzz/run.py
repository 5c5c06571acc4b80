"""Runs one fuzz target under atheris: python fuzz/run.py NAME [libFuzzer options and corpus dirs]."""

from __future__ import annotations

import logging
import sys

import atheris
import structlog

with atheris.instrument_imports(include=["meshca"]):
    import targets  # the meshca modules it imports are instrumented for coverage


def main() -> None:
    # Refusals are logged at warning level; a fuzzing run needs none of it (the library never configures logging).
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
    name = sys.argv.pop(1)
    if name not in targets.TARGETS:
        sys.exit(f"unknown target {name!r}; targets: {', '.join(targets.TARGETS)}")

    def one(data: bytes) -> None:
        targets.run_one(name, data)

    atheris.Setup(sys.argv, one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
