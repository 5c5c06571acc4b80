"""`meshca entry create|list|delete` and `meshca token create --agent`, as an operator runs them."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support.agents import Agent, agent_stub
from support.calls import native_request
from support.certs import spiffe_csr
from support.procs import Result, meshca_cmd
from support.serving import serving

from meshca._proto import meshca_agent_pb2 as apb
from meshca.cli import main
from meshca.testing import TestCA

Run = Callable[..., Result]
TD = "example.org"
NODE_1 = f"spiffe://{TD}/meshca/agent/node-1"


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Iterator[Run]:
    """`meshca.cli.main` in-process (the subprocess runs are in the end-to-end tests below)."""

    def run(*args: str | Path) -> Result:
        capsys.readouterr()
        try:
            code = main([str(a) for a in args])
        except SystemExit as exc:  # argparse --help
            code = exc.code if isinstance(exc.code, int) else 1
        out, err = capsys.readouterr()
        return Result(code, out, err)

    yield run


@pytest.fixture
def ca_dir(d: Path, server_ca: TestCA) -> Path:
    server_ca.write(d)
    return d


def one_line_error(result: Result, code: int) -> str:
    assert result.code == code, result
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("meshca: error: "), result.stderr
    return lines[0]


def test_create_list_delete(ca_dir: Path, cli: Run) -> None:
    created = cli(
        "entry", "create", "--dir", ca_dir, "--spiffe-id", f"spiffe://{TD}/web",
        "--selector", "unix:uid:1000", "--selector", "unix:path:/usr/bin/web",
        "--parent", NODE_1, "--x509-ttl", "2h", "--jwt-ttl", "10m", "--dns", "web.example.org",
    )  # fmt: skip
    assert created.code == 0, created
    entry_id = created.stdout.strip()
    assert len(entry_id) == 32
    second = cli(
        "entry", "create", "--dir", ca_dir, "--spiffe-id", f"spiffe://{TD}/db", "--selector", "unix:gid:5", "--json"
    )
    assert second.code == 0, second
    doc = json.loads(second.stdout)
    assert (doc["spiffe_id"], doc["selectors"], doc["parent"], doc["x509_ttl_seconds"]) == (
        f"spiffe://{TD}/db",
        ["unix:gid:5"],
        "",
        0,
    )

    listed = json.loads(cli("entry", "list", "--dir", ca_dir, "--json").stdout)
    assert [e["id"] for e in listed] == [entry_id, doc["id"]]
    assert listed[0] | {"created_at": ""} == {
        "id": entry_id,
        "spiffe_id": f"spiffe://{TD}/web",
        "selectors": ["unix:path:/usr/bin/web", "unix:uid:1000"],
        "parent": NODE_1,
        "x509_ttl_seconds": 7200,
        "jwt_ttl_seconds": 600,
        "dns_names": ["web.example.org"],
        "created_at": "",
    }
    text = cli("entry", "list", "--dir", ca_dir).stdout.splitlines()
    assert text[0].split("  ") == [
        entry_id,
        f"spiffe://{TD}/web",
        "unix:path:/usr/bin/web,unix:uid:1000",
        f"parent={NODE_1}",
        "x509-ttl=2h",
        "jwt-ttl=10m",
        "dns=web.example.org",
    ]
    assert text[1].endswith("parent=*")

    assert cli("entry", "delete", "--dir", ca_dir, entry_id).code == 0
    assert (
        one_line_error(cli("entry", "delete", "--dir", ca_dir, entry_id), 1) == f"meshca: error: no entry {entry_id!r}"
    )
    assert [e["id"] for e in json.loads(cli("entry", "list", "--dir", ca_dir, "--json").stdout)] == [doc["id"]]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--spiffe-id", "spiffe://other.org/web"], "spiffe://other.org/web is not in trust domain example.org"),
        (["--spiffe-id", f"spiffe://{TD}/meshca/agent/x"], "is reserved for meshca's own components"),
        (["--spiffe-id", f"spiffe://{TD}"], "an entry's SPIFFE ID has a path"),
        (["--spiffe-id", "spiffe://example.org/a/"], "trailing slash"),
        (["--selector", "unix:uid"], "selector 'unix:uid' is not TYPE:KEY:VALUE"),
        (["--selector", "k8s:ns:default"], "selector 'k8s:ns:default' is of no known kind"),
        (["--selector", "unix:uid:root"], "the value must be a decimal user id"),
        (["--selector", "unix:uid:-1"], "the value must be a decimal user id"),
        (["--selector", "unix:uid:4294967296"], "the value must be a decimal user id"),
        (["--selector", "unix:path:bin/web"], "the value must be an absolute executable path"),
        (["--selector", "unix:user:bad name"], "the value must be a user name"),
        (["--parent", f"spiffe://{TD}/ns/default/sa/web"], "is not an agent ID of this trust domain"),
        (["--parent", "spiffe://other.org/meshca/agent/n"], "is not an agent ID of this trust domain"),
        (["--x509-ttl", "0s"], "argument --x509-ttl: duration must be positive"),
        (["--x509-ttl", "91d"], "X.509-SVID lifetime 7862400s is above the maximum 7776000s"),
        (["--jwt-ttl", "2h"], "JWT-SVID lifetime 7200s is above the maximum 3600s"),
        (["--dns", "Web.Example.org"], "DNS name 'Web.Example.org' is not a lower-case host name"),
        (["--x509-ttl", "soon"], "argument --x509-ttl"),
    ],
)
def test_create_refuses_bad_input_in_one_line(ca_dir: Path, cli: Run, args: list[str], message: str) -> None:
    base = {"--spiffe-id": f"spiffe://{TD}/web", "--selector": "unix:uid:1000"}
    for flag, value in zip(args[::2], args[1::2], strict=True):
        base[flag] = value
    result = cli("entry", "create", "--dir", ca_dir, *[x for pair in base.items() for x in pair])
    assert message in one_line_error(result, 2)
    assert cli("entry", "list", "--dir", ca_dir, "--json").stdout.strip() == "[]"


def test_create_needs_a_selector(ca_dir: Path, cli: Run) -> None:
    result = cli("entry", "create", "--dir", ca_dir, "--spiffe-id", f"spiffe://{TD}/web")
    assert "--selector" in one_line_error(result, 2)


def test_entries_live_in_the_store_the_url_names(ca_dir: Path, cli: Run, pg_database: str) -> None:
    made = cli(
        "entry",
        "create",
        "--dir",
        ca_dir,
        "--store",
        pg_database,
        "--spiffe-id",
        f"spiffe://{TD}/web",
        "--selector",
        "unix:uid:1",
    )
    assert made.code == 0, made
    assert (
        json.loads(cli("entry", "list", "--dir", ca_dir, "--store", pg_database, "--json").stdout)[0]["id"]
        == made.stdout.strip()
    )
    assert json.loads(cli("entry", "list", "--dir", ca_dir, "--json").stdout) == []  # not in DIR/meshca.db


# -- agent tokens


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--agent", "a/b"], "--agent: an agent name is one non-empty path segment"),
        (["--agent", "a b"], "--agent: path has the character ' '"),
        (["--agent", "n", "--spiffe-id", f"spiffe://{TD}/web"], "not allowed with argument"),
        # one agent ID is one node: two nodes joined with one token would share it
        (["--agent", "n", "--uses", "2"], "--agent: an agent token is single-use"),
        (
            ["--spiffe-id", NODE_1],
            "is reserved for meshca's own components (spiffe://TD/meshca/...): no token grants it",
        ),
    ],
)
def test_token_create_agent_refusals(ca_dir: Path, cli: Run, args: list[str], message: str) -> None:
    result = cli("token", "create", "--dir", ca_dir, *args)
    line = one_line_error(result, result.code)
    assert result.code in (1, 2)
    assert message in line


async def test_an_operator_enrols_an_agent_and_it_syncs_the_entries_made_for_it(d: Path, server_ca: TestCA) -> None:
    """The real console script, end to end: token create --agent, entry create, then the Agent API."""
    async with serving(d, server_ca) as h:
        made = await asyncio.to_thread(meshca_cmd, "token", "create", "--dir", d, "--agent", "node-1", "--json")
        assert made.code == 0, made
        token = json.loads(made.stdout)
        assert token["spiffe_id"] == NODE_1
        entry = await asyncio.to_thread(
            meshca_cmd, "entry", "create", "--dir", d, "--spiffe-id", f"spiffe://{TD}/web",
            "--selector", "unix:uid:1000", "--parent", NODE_1,
        )  # fmt: skip
        assert entry.code == 0, entry
        key, csr = spiffe_csr(NODE_1)
        answer = await h.native.IssueSVID(native_request(csr, join_token=token["token"]))
        assert answer.spiffe_id == NODE_1
        agent = Agent(h.server.state.issuer.trust_domain.agent_id("node-1"), (answer.leaf, *answer.intermediates), key)
        sync = await agent_stub(h).Sync(agent.prove(apb.SyncRequest(), "Sync", h.clock()))
        assert [e.id for e in sync.entries] == [entry.stdout.strip()]
        listed = await asyncio.to_thread(meshca_cmd, "entry", "list", "--dir", d)
        assert listed.stdout.startswith(entry.stdout.strip())
