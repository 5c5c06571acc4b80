"""`meshca install`: its output is valid Kubernetes (the OpenAPI schemas, offline) and says what the issue asks."""

from __future__ import annotations

import base64
import json
import os
import re
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from support.certbuild import NOW
from support.procs import Result

from meshca import TrustDomain
from meshca.cli import build_parser, main
from meshca.cli._serve import server_config
from meshca.pki._trustdir import TrustDir
from meshca.testing import FrozenClock

# Schemas shipped by kubernetes-validate: a recent release, and an older one still run in production.
K8S_VERSIONS = ("1.31.0", "1.37.0")
SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
KINDS = [
    "Namespace",
    "ServiceAccount",
    "ClusterRoleBinding",
    "Secret",
    "ConfigMap",
    "Deployment",
    "Service",
    "PodDisruptionBudget",
]
Doc = dict[str, Any]
Install = Callable[..., Result]

# flags -> (replicas, store secret)
COMBINATIONS = {
    "sqlite": ([], 1, None),
    "sqlite-explicit-one": (["--replicas", "1", "--namespace", "identity"], 1, None),
    "postgres-default-replicas": (["--store-secret", "meshca-db"], 3, "meshca-db"),
    "postgres": (["--store-secret", "pg.url", "--replicas", "5", "--namespace", "ca-2"], 5, "pg.url"),
    "image-and-names": (
        ["--image", "registry.example/meshca:1@sha256:" + "a" * 64, "--server-name", "ca.example.org"],
        1,
        None,
    ),
}


@pytest.fixture(scope="module")
def td(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A trust directory as `meshca init` leaves it: the anchor key is there too."""
    path = tmp_path_factory.mktemp("install") / "td"
    TrustDir.at(path).init(TrustDomain("example.org"), now=NOW)
    return path


@pytest.fixture
def install(td: Path, capsys: pytest.CaptureFixture[str]) -> Install:
    def run(*args: str | Path, directory: Path = td, clock: FrozenClock | None = None) -> Result:
        capsys.readouterr()
        code = main(["install", "--dir", str(directory), *map(str, args)], clock=clock or FrozenClock(NOW))
        out, err = capsys.readouterr()
        return Result(code, out, err)

    return run


def _docs(result: Result) -> list[Doc]:
    assert result.code == 0, result
    # kubectl picks its JSON decoder when the stream starts with '{', and that one stops at the first '---'.
    assert result.stdout.startswith("# meshca install: ")
    docs = [doc for doc in yaml.safe_load_all(result.stdout) if doc is not None]
    as_json = [json.loads(chunk) for chunk in result.stdout.split("\n---\n")[1:]]
    assert docs == as_json, "every document is JSON, which YAML reads the same"
    return docs


def _one(docs: list[Doc], kind: str) -> Doc:
    (doc,) = (d for d in docs if d["kind"] == kind)
    return doc


def _container(docs: list[Doc]) -> Doc:
    (container,) = _one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    return container


def _serve_parses_store() -> bool:
    return hasattr(build_parser().parse_args(["serve"]), "store")


@pytest.mark.parametrize("flags", COMBINATIONS.values(), ids=COMBINATIONS.keys())
def test_every_combination_is_valid_kubernetes(install: Install, flags: tuple[list[str], int, str | None]) -> None:
    args, replicas, store_secret = flags
    docs = _docs(install(*args))
    expected = KINDS if store_secret else [*KINDS[:5], "PersistentVolumeClaim", *KINDS[5:]]
    assert [d["kind"] for d in docs] == expected
    for doc in docs:
        for k8s in K8S_VERSIONS:
            kubernetes_validate.validate(doc, k8s, strict=True)  # strict: an unknown field is an error too
    assert _one(docs, "Deployment")["spec"]["replicas"] == replicas
    env = {e["name"]: e for e in _container(docs).get("env", [])}
    if store_secret:
        assert env["MESHCA_STORE"]["valueFrom"] == {"secretKeyRef": {"name": store_secret, "key": "url"}}
    else:
        assert "MESHCA_STORE" not in env


def test_the_schemas_catch_a_wrong_manifest(install: Install) -> None:
    """The validation above can fail: a misspelt field and a wrong type are refused."""
    deployment = _one(_docs(install()), "Deployment")
    deployment["spec"]["replica"] = deployment["spec"].pop("replicas")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)
    deployment["spec"]["replicas"] = "three"
    del deployment["spec"]["replica"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)


def test_the_pod_is_locked_down_probed_sized_and_spread(install: Install) -> None:
    docs = _docs(install("--store-secret", "db"))
    pod = _one(docs, "Deployment")["spec"]["template"]["spec"]
    container = _container(docs)
    security = container["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["securityContext"]["runAsUser"] != 0
    assert container["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "http-metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http-metrics"}
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"tls-grpc": 8443, "http-metrics": 9090}
    assert set(container["resources"]) == {"requests", "limits"}
    for resources in container["resources"].values():
        assert set(resources) == {"cpu", "memory"}
    labels = _one(docs, "Deployment")["spec"]["selector"]["matchLabels"]
    (by_node,) = (c for c in pod["topologySpreadConstraints"] if c["topologyKey"] == "kubernetes.io/hostname")
    assert by_node["whenUnsatisfiable"] == "DoNotSchedule"
    assert by_node["labelSelector"]["matchLabels"] == labels
    assert _one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"] == labels
    # the read-only root needs a writable /tmp for the workers' metrics files
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
    service = _one(docs, "Service")["spec"]
    assert service["selector"] == labels
    assert {p["name"]: p["port"] for p in service["ports"]} == {"tls-grpc": 8443, "http-metrics": 9090}
    assert _one(docs, "PodDisruptionBudget")["spec"] == {"maxUnavailable": 1, "selector": {"matchLabels": labels}}


def test_tokenreview_against_the_in_cluster_api_server(install: Install) -> None:
    docs = _docs(install("--namespace", "identity", "--store-secret", "db"))
    binding = _one(docs, "ClusterRoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": "system:auth-delegator",
    }
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "meshca", "namespace": "identity"}]
    pod = _one(docs, "Deployment")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == _one(docs, "ServiceAccount")["metadata"]["name"] == "meshca"
    assert pod["automountServiceAccountToken"] is True
    # The pod's arguments are ones `meshca serve` takes, and mean what they should.
    args = build_parser().parse_args(["serve", *_container(docs)["args"]])
    config = server_config(args, Path(args.dir))
    assert config.token_review is not None
    assert config.token_review.api_url == "https://kubernetes.default.svc"
    assert str(config.token_review.ca_file) == f"{SA_DIR}/ca.crt"
    assert str(config.token_review.token_file) == f"{SA_DIR}/token"
    assert config.server_names == ("meshca.identity.svc", "meshca.identity.svc.cluster.local")
    assert (config.listen, config.metrics_listen) == ("0.0.0.0:8443", "0.0.0.0:9090")
    assert args.workers >= 1
    assert all(doc["metadata"].get("namespace", "identity") == "identity" for doc in docs)


@pytest.mark.skipif(not _serve_parses_store(), reason="`meshca serve --store` is not on this branch yet")
def test_single_replica_serves_sqlite_from_the_volume(install: Install) -> None:
    docs = _docs(install())
    args = build_parser().parse_args(["serve", *_container(docs)["args"]])
    assert args.store == "sqlite:///var/lib/meshca/meshca.db"


def test_single_replica_mode_keeps_sqlite_on_a_volume_and_says_so(install: Install) -> None:
    result = install()
    docs = _docs(result)
    assert "on SQLite in PersistentVolumeClaim meshca-store" in result.stdout.splitlines()[0]
    assert "meshca: note: 1 replica in namespace meshca on SQLite" in result.stderr
    claim = _one(docs, "PersistentVolumeClaim")
    deployment = _one(docs, "Deployment")["spec"]
    volumes = {v["name"]: v for v in deployment["template"]["spec"]["volumes"]}
    assert volumes["store"]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert {"name": "store", "mountPath": "/var/lib/meshca"} in _container(docs)["volumeMounts"]
    assert "--store=sqlite:///var/lib/meshca/meshca.db" in _container(docs)["args"]
    assert deployment["strategy"] == {"type": "Recreate"}, "two pods never open the SQLite file together"
    postgres = install("--store-secret", "db")
    assert "PostgreSQL" in postgres.stdout.splitlines()[0]
    assert "SQLite" not in postgres.stderr
    assert not any(a.startswith("--store") for a in _container(_docs(postgres))["args"])


def test_the_projected_volume_is_the_trust_directory_serve_expects(install: Install, td: Path, tmp_path: Path) -> None:
    """Lays the Secret and the ConfigMap out as kubelet would and loads the issuer from there."""
    docs = _docs(install())
    sources = {"Secret": _one(docs, "Secret"), "ConfigMap": _one(docs, "ConfigMap")}
    assert sources["Secret"]["type"] == "kubernetes.io/tls"
    pod = _one(docs, "Deployment")["spec"]["template"]["spec"]
    (trust,) = (v for v in pod["volumes"] if v["name"] == "trust")
    mount = next(m for m in _container(docs)["volumeMounts"] if m["name"] == "trust")
    assert mount["readOnly"] is True
    assert f"--dir={mount['mountPath']}" in _container(docs)["args"]
    laid_out = tmp_path / "etc-meshca"
    laid_out.mkdir()
    for source in trust["projected"]["sources"]:
        ((kind, ref),) = source.items()
        obj = sources["Secret" if kind == "secret" else "ConfigMap"]
        assert ref["name"] == obj["metadata"]["name"]
        for item in ref["items"]:
            value = obj["data"][item["key"]]
            data = base64.b64decode(value) if kind == "secret" else value.encode()
            (laid_out / item["path"]).write_bytes(data)
    assert sorted(p.name for p in laid_out.iterdir()) == ["bundle.pem", "issuer.crt", "issuer.key"]
    for name in ("bundle.pem", "issuer.crt", "issuer.key"):
        assert (laid_out / name).read_bytes() == (td / name).read_bytes()
    assert TrustDir.at(laid_out).load_issuer().trust_domain.name == "example.org"
    modes = {i["path"]: i.get("mode") for s in trust["projected"]["sources"] for i in next(iter(s.values()))["items"]}
    assert modes["issuer.key"] == 0o440
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"]


# Paths the process opens while a test listens (an audit hook cannot be removed, so it stays idle otherwise).
_opened: list[str] | None = None


def _record_open(event: str, args: tuple[Any, ...]) -> None:
    if event == "open" and _opened is not None:
        _opened.append(os.fsdecode(args[0]) if isinstance(args[0], str | bytes | os.PathLike) else str(args[0]))


sys.addaudithook(_record_open)


def test_install_never_opens_the_trust_anchor_key(install: Install, td: Path) -> None:
    global _opened
    _opened = []
    try:
        result = install()
    finally:
        opened, _opened = _opened, None
    assert result.code == 0, result
    assert {Path(p).name for p in opened if Path(p).parent == td} == {"issuer.crt", "issuer.key", "bundle.pem"}


def test_the_trust_anchor_key_is_never_in_the_output(install: Install, td: Path) -> None:
    anchor_key = (td / "trust-anchor.key").read_bytes()
    assert anchor_key
    body = [line for line in anchor_key.decode().splitlines() if line and not line.startswith("-----")]
    for args in COMBINATIONS.values():
        result = install(*args[0])
        docs = _docs(result)
        decoded = "".join(base64.b64decode(v).decode() for v in _one(docs, "Secret")["data"].values())
        for text in (result.stdout, result.stderr, decoded):
            assert base64.b64encode(anchor_key).decode() not in text
            for line in body:
                assert line not in text
        assert "trust-anchor.key is not in the output" in result.stderr


def _assert_one_line(result: Result, code: int, message: str) -> None:
    assert result.code == code, result
    assert result.stdout == ""
    assert re.fullmatch(rf"meshca: error: .*{message}.*\n", result.stderr), result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--replicas", "2"], "--replicas above 1 needs --store-secret"),
        (["--replicas", "0", "--store-secret", "db"], "--replicas must be at least 1"),
        (["--namespace", "Meshca"], "is not a DNS label"),
        (["--namespace", "mesh.ca"], "is not a DNS label"),
        (["--namespace", "a" * 64], "is not a DNS label"),
        (["--namespace=-meshca"], "is not a DNS label"),
        (["--namespace", "default"], "a namespace of its own"),
        (["--namespace", "kube-system"], "a namespace of its own"),
        (["--store-secret", "DB_URL"], "is not a DNS name"),
        (["--server-name", "ca example"], "is not a DNS name"),
        (["--image", "meshca latest"], "is not an image reference"),
        (["--issuer-ttl", "7d"], "--issuer-ttl goes with --manage-issuers"),
    ],
)
def test_usage_errors(install: Install, args: list[str], message: str) -> None:
    _assert_one_line(install(*args), 2, re.escape(message))


def test_refuses_a_directory_without_an_issuer(install: Install, td: Path, tmp_path: Path) -> None:
    _assert_one_line(install(directory=tmp_path / "missing"), 1, "has no issuer")
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "issuer.crt").write_bytes((td / "issuer.crt").read_bytes())
    _assert_one_line(install(directory=partial), 1, "has no issuer")
    (partial / "issuer.key").write_bytes((td / "issuer.key").read_bytes())
    _assert_one_line(install(directory=partial), 1, "bundle.pem")


def test_refuses_an_issuer_the_pod_could_not_serve(install: Install) -> None:
    """An expired issuer fails here, not in a crash-looping pod."""
    _assert_one_line(install(clock=FrozenClock(NOW + timedelta(days=400))), 1, "issuer chain expired")


def test_install_help_lists_its_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["install", "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--dir", "--namespace", "--replicas", "--store-secret", "--image", "--server-name"):
        assert flag in out


# -- managed issuers: the anchor goes into the cluster, the pods mint their own issuers


def test_managed_issuers_put_the_anchor_in_a_secret_and_the_flag_in_the_pod(
    install: Install, td: Path, tmp_path: Path
) -> None:
    result = install("--manage-issuers", "--issuer-ttl", "6d", "--store-secret", "db")
    docs = _docs(result)
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSIONS[-1], strict=True)
    secret = _one(docs, "Secret")
    assert secret["metadata"]["name"] == "meshca-anchor" and secret["type"] == "kubernetes.io/tls"
    args = _container(docs)["args"]
    assert "--manage-issuers" in args and "--issuer-ttl=6d" in args
    parsed = build_parser().parse_args(["serve", *args])
    assert server_config(parsed, Path(parsed.dir)).issuer_ttl == timedelta(days=6)
    # laid out as kubelet would: the directory a managed service mints from, without the issuer's key
    pod = _one(docs, "Deployment")["spec"]["template"]["spec"]
    (trust,) = (v for v in pod["volumes"] if v["name"] == "trust")
    laid_out = tmp_path / "etc-meshca"
    laid_out.mkdir()
    for source in trust["projected"]["sources"]:
        ((kind, ref),) = source.items()
        obj = secret if kind == "secret" else _one(docs, "ConfigMap")
        for item in ref["items"]:
            value = obj["data"][item["key"]]
            (laid_out / item["path"]).write_bytes(base64.b64decode(value) if kind == "secret" else value.encode())
            os.chmod(laid_out / item["path"], item.get("mode", 0o444))
    assert sorted(p.name for p in laid_out.iterdir()) == ["bundle.pem", "trust-anchor.crt", "trust-anchor.key"]
    from meshca.server._state import load_anchor

    assert load_anchor(TrustDir.at(laid_out), None).certificate == TrustDir.at(td).load_bundle().anchors[0]
    issuer_key = (td / "issuer.key").read_bytes().decode()
    assert base64.b64encode(issuer_key.encode()).decode() not in result.stdout
    assert "controls the trust domain" in result.stderr and "minting their own issuers" in result.stdout


def test_managed_issuers_refuse_what_the_pods_could_not_serve(install: Install, td: Path, tmp_path: Path) -> None:
    _assert_one_line(install("--manage-issuers", "--issuer-ttl", "1d"), 2, "does not fit")
    no_anchor = tmp_path / "no-anchor"
    TrustDir.at(no_anchor).init(TrustDomain("example.org"), now=NOW)
    (no_anchor / "trust-anchor.key").unlink()
    _assert_one_line(install("--manage-issuers", directory=no_anchor), 1, "has no trust anchor")
