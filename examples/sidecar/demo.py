"""Starts meshca serve, two sidecars and two tiny apps on loopback, then an unauthorized third workload.

    python examples/sidecar/demo.py

web app --plain--> web sidecar --mTLS--> api sidecar --plain--> api app
                                          ^
intruder sidecar --mTLS-------------------+  (refused: not in api's --allow list)

Exits 0 when the authorized call goes through and the intruder is refused.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TD = "cluster.local"
WEB = f"spiffe://{TD}/ns/default/sa/web"
API = f"spiffe://{TD}/ns/default/sa/api"
INTRUDER = f"spiffe://{TD}/ns/default/sa/intruder"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Proc:
    """A child process whose output lines are echoed and kept."""

    def __init__(self, name: str, argv: list[str]) -> None:
        self.name = name
        self.lines: list[str] = []
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip())
            if '"event"' not in line:  # the CA's JSON logs stay quiet
                print(line.rstrip(), flush=True)

    def wait_for(self, text: str, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines:
                if text in line:
                    return line
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.name} exited early:\n" + "\n".join(self.lines[-20:]))
            time.sleep(0.05)
        raise SystemExit(f"timed out waiting for {text!r} from {self.name}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def api_app(port: int, ready: threading.Event) -> None:
    """The api: answers every line with a greeting."""
    with socket.socket() as srv:
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", port))
        srv.listen()
        srv.settimeout(60)
        ready.set()
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                data = conn.recv(1024)
                conn.sendall(b"api says hello, you sent: " + data)


def call(port: int, message: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(message)
        chunks = []
        while chunk := s.recv(1024):
            chunks.append(chunk)
            if b"\n" in chunk or len(b"".join(chunks)) > 100:
                break
        return b"".join(chunks)


def meshca(*args: str) -> str:
    return subprocess.run(
        [sys.executable, "-m", "meshca.cli", *args], check=True, capture_output=True, text=True
    ).stdout.strip()


def main() -> int:
    procs: list[Proc] = []
    with tempfile.TemporaryDirectory(prefix="meshca-demo-") as tmp:
        ca_dir = Path(tmp) / "ca"
        ca_port = free_port()
        try:
            ca = Proc(
                "meshca",
                [
                    sys.executable,
                    "-m",
                    "meshca.cli",
                    "serve",
                    "--dir",
                    str(ca_dir),
                    "--create",
                    "--listen",
                    f"127.0.0.1:{ca_port}",
                    "--metrics-listen",
                    "",
                ],
            )
            procs.append(ca)
            ca.wait_for('"server.started"')
            server = f"localhost:{ca_port}"
            bundle = str(ca_dir / "bundle.pem")
            tokens = {
                sid: meshca("token", "create", "--dir", str(ca_dir), "--spiffe-id", sid) for sid in (WEB, API, INTRUDER)
            }

            api_port, api_in, web_out, intruder_out = free_port(), free_port(), free_port(), free_port()
            ready = threading.Event()
            threading.Thread(target=api_app, args=(api_port, ready), daemon=True).start()
            ready.wait(10)

            def sidecar(name: str, sid: str, *extra: str) -> Proc:
                argv = [
                    sys.executable,
                    str(HERE / "sidecar.py"),
                    "--name",
                    name,
                    "--server",
                    server,
                    "--bundle",
                    bundle,
                    "--spiffe-id",
                    sid,
                    "--token",
                    tokens[sid],
                    *extra,
                ]
                proc = Proc(name, argv)
                procs.append(proc)
                return proc

            api_car = sidecar(
                "api-sidecar", API, "--inbound", f"127.0.0.1:{api_in}", "--app", f"127.0.0.1:{api_port}", "--allow", WEB
            )
            web_car = sidecar(
                "web-sidecar",
                WEB,
                "--outbound",
                f"127.0.0.1:{web_out}",
                "--remote",
                f"127.0.0.1:{api_in}",
                "--remote-id",
                API,
            )
            intruder_car = sidecar(
                "intruder-sidecar",
                INTRUDER,
                "--outbound",
                f"127.0.0.1:{intruder_out}",
                "--remote",
                f"127.0.0.1:{api_in}",
                "--remote-id",
                API,
            )
            for car in (api_car, web_car, intruder_car):
                car.wait_for("listening")

            print("\n--- web app calls the api through its sidecar", flush=True)
            reply = call(web_out, b"hi from web\n")
            print(f"[web app] got: {reply.decode().strip()}", flush=True)
            api_car.wait_for(f"inbound: authorized {WEB}")

            print("\n--- intruder calls the api through its sidecar", flush=True)
            intruder_reply = call(intruder_out, b"hi from intruder\n")
            print(f"[intruder app] got: {intruder_reply.decode().strip() or '(connection closed)'}", flush=True)
            api_car.wait_for("tls.peer_refused")

            ok = reply.startswith(b"api says hello") and not intruder_reply
            print("\nresult:", "OK: web authorized, intruder refused" if ok else "UNEXPECTED", flush=True)
            return 0 if ok else 1
        finally:
            for proc in reversed(procs):
                proc.stop()


if __name__ == "__main__":
    sys.exit(main())
