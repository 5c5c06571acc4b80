"""``python -m meshca``: the ``meshca`` command."""

from meshca.cli import run

if __name__ == "__main__":
    run()
