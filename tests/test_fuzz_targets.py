"""Every fuzz target over its seeds and every crash it found: a clean result or a MeshcaError, never more.

`scripts/fuzz.sh` does the fuzzing (CI runs it for a bounded time); this
replays what it found so a fixed crash stays fixed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

FUZZ = Path(__file__).resolve().parent.parent / "fuzz"
sys.path.insert(0, str(FUZZ))
import targets  # noqa: E402

CASES = [(name, path) for name in targets.TARGETS for path in targets.corpus(name)]


@pytest.mark.parametrize(("name", "path"), CASES, ids=[f"{n}/{p.parent.name}/{p.name}" for n, p in CASES])
def test_input_keeps_the_invariant(name: str, path: Path) -> None:
    targets.run_one(name, path.read_bytes())


@pytest.mark.parametrize("name", sorted(targets.TARGETS))
def test_every_target_has_seeds(name: str) -> None:
    assert any(p.parent.parent.name == "corpus" for p in targets.corpus(name))


def test_the_harness_lets_other_exceptions_through(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(data: bytes) -> None:
        raise ValueError(data)

    monkeypatch.setitem(targets.TARGETS, "broken", broken)
    with pytest.raises(ValueError):
        targets.run_one("broken", b"x")
