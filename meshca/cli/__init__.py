"""The ``meshca`` command: bootstrap, inspect, check and run a trust domain.

Every command exits 0 on success and non-zero with one line on stderr on
error; commands that print data accept ``--json``. One module per command
group (docs/architecture.md, CLI).
"""

from meshca.cli._main import build_parser, main, run
from meshca.cli._options import CliError

__all__ = ["CliError", "build_parser", "main", "run"]
