"""``python -m meshca.cli``, as the examples and benchmarks run it."""

from meshca.cli import run

if __name__ == "__main__":
    run()
