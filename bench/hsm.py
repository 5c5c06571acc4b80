"""Issuances/s with the issuer key on a PKCS#11 token (SoftHSM2) beside the same service with it in memory.

    python bench/hsm.py             # 3 alternating rounds of 5,000 requests each
    python bench/hsm.py --smoke     # 1 round of 300: checks the harness, measures nothing

Two `meshca serve --workers N` on 127.0.0.1, driven like bench/run.py's
meshca (h2load, one fixed IssueSVID request with a multi-use join token,
issuances counted from meshca's own log): one with the issuer key in
memory (DIR/issuer.key), one whose issuer key was generated on a throwaway
SoftHSM2 token (`meshca init --issuer-key-uri`), each worker signing through
its own PKCS#11 session. Needs Debian's softhsm2 and nghttp2-client, and
python-pkcs11 (`pip install 'meshca[hsm]'`).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from run import Meshca, Run, rounds

SOFTHSM_MODULES = ("/usr/lib/softhsm/libsofthsm2.so", "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so")


def throwaway_token(work: Path) -> str:
    """Initializes a SoftHSM2 token in ``work`` (SOFTHSM2_CONF is set for the servers); returns an issuer key URI."""
    module = next((m for m in SOFTHSM_MODULES if Path(m).is_file()), None)
    if module is None or shutil.which("softhsm2-util") is None:
        raise SystemExit("SoftHSM2 is missing: apt-get install softhsm2")
    (work / "tokens").mkdir()
    conf = work / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {work / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    pin = work / "pin"
    pin.write_text("bench-pin\n")
    subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", "bench", "--so-pin", "bench-so",
                    "--pin", pin.read_text().strip()], check=True, capture_output=True)
    return f"pkcs11:token=bench;object=issuer?module-path={module}&pin-source=file:{pin}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="1 round of 300 requests: checks the harness")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    warmup = 500
    if args.smoke:
        args.rounds, args.requests, warmup = 1, 300, 50
    if shutil.which("h2load") is None:
        raise SystemExit("h2load is missing: run 'bash bench/setup.sh' (Debian nghttp2-client)")
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="meshca-bench-hsm-") as tmp:
        work = Path(tmp)
        uri = throwaway_token(work)
        servers = [
            Meshca(work, args.workers, name="memory"),
            Meshca(work, args.workers, name="softhsm2", init_args=("--issuer-key-uri", uri)),
        ]
        try:
            print(f"warm-up; then {args.rounds} alternating rounds of {args.requests} requests; "
                  f"meshca --workers {args.workers}", flush=True)
            runs += rounds(servers, count=args.rounds, requests=args.requests, warmup=warmup)[0]
        finally:
            for server in servers:
                server.stop()

    def med(server: str, field: str) -> float:
        return statistics.median(getattr(r, field) for r in runs if r.server == server)

    print("\n| issuer key | issuances/s | p50 ms | p99 ms |")
    print("|---|---|---|---|")
    for name in ("memory", "softhsm2"):
        print(f"| {name} | {med(name, 'rps'):,.0f} | {med(name, 'p50_ms'):.2f} | {med(name, 'p99_ms'):.2f} |")
    print(f"\nSoftHSM2 / memory: {med('softhsm2', 'rps') / med('memory', 'rps'):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
