"""The Kubernetes objects `meshca install` prints: pure data in, plain dicts out (no I/O).

The pod reads its trust directory from one read-only projected volume: the
issuer Secret (type kubernetes.io/tls, so `kubectl create secret tls` and
cert-manager can write it) and the bundle ConfigMap, mapped to the file names
`meshca serve --dir` expects. The trust anchor's key is never an input here,
except with managed issuers (`Install.issuer_ttl`): the Secret is then the
anchor's (`meshca-anchor`, mapped to trust-anchor.crt and trust-anchor.key)
and the pods mint their own issuers.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from meshca.pki._time import format_duration

__all__ = ["GRPC_PORT", "METRICS_PORT", "NAME", "Install", "manifests", "yaml_stream"]

NAME = "meshca"  # every object's name: one install per namespace
GRPC, GRPC_PORT = "tls-grpc", 8443
METRICS, METRICS_PORT = "http-metrics", 9090
UID = 10001  # the Dockerfile's user
TRUST_MOUNT = "/etc/meshca"
STORE_MOUNT = "/var/lib/meshca"
SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"  # the in-cluster credentials kubelet mounts
WORKERS = 2  # serving processes per pod; the CPU limit below matches
Doc = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Install:
    """What `meshca install` was asked for, already validated by the CLI."""

    namespace: str
    image: str
    replicas: int
    store_secret: str | None  # a Secret whose key `url` is a PostgreSQL URL; None: SQLite on a volume
    extra_server_names: tuple[str, ...] = ()
    issuer_ttl: timedelta | None = None  # managed issuers (`serve --manage-issuers`); None: the issuer Secret

    @property
    def secret(self) -> tuple[str, str, str]:
        """The trust Secret's name and the file names its tls.crt and tls.key become."""
        if self.issuer_ttl is not None:
            return f"{NAME}-anchor", "trust-anchor.crt", "trust-anchor.key"
        return f"{NAME}-issuer", "issuer.crt", "issuer.key"

    @property
    def server_names(self) -> tuple[str, ...]:
        svc = f"{NAME}.{self.namespace}.svc"
        return (svc, f"{svc}.cluster.local", *self.extra_server_names)

    @property
    def summary(self) -> str:
        if self.store_secret:
            store = f"on PostgreSQL (MESHCA_STORE from Secret {self.store_secret}, key url)"
        else:
            store = (
                f"on SQLite in PersistentVolumeClaim {NAME}-store: SQLite cannot be shared, "
                "pass --store-secret NAME to run several replicas on PostgreSQL"
            )
        plural = "s" if self.replicas > 1 else ""
        managed = "" if self.issuer_ttl is None else ", minting their own issuers from the anchor"
        return f"{self.replicas} replica{plural} in namespace {self.namespace} {store}{managed}"


def manifests(install: Install, *, cert: bytes, key: bytes, bundle: bytes) -> list[Doc]:
    """Every object of the install, in the order `kubectl apply` should create them.

    ``cert`` and ``key``: the issuer's (chain and key), or with managed issuers the anchor's.
    """
    docs = [
        _object("v1", "Namespace", install.namespace, name=install.namespace, namespaced=False),
        _object("v1", "ServiceAccount", install.namespace),
        # TokenReview: meshca asks the API server who a caller's service-account token belongs to.
        _object(
            "rbac.authorization.k8s.io/v1",
            "ClusterRoleBinding",
            install.namespace,
            name=f"{NAME}-{install.namespace}-auth-delegator",
            namespaced=False,
            roleRef={"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "system:auth-delegator"},
            subjects=[{"kind": "ServiceAccount", "name": NAME, "namespace": install.namespace}],
        ),
        _object(
            "v1",
            "Secret",
            install.namespace,
            name=install.secret[0],
            type="kubernetes.io/tls",
            data={"tls.crt": _b64(cert), "tls.key": _b64(key)},
        ),
        _object("v1", "ConfigMap", install.namespace, name=f"{NAME}-bundle", data={"bundle.pem": bundle.decode()}),
    ]
    if not install.store_secret:
        docs.append(
            _object(
                "v1",
                "PersistentVolumeClaim",
                install.namespace,
                name=f"{NAME}-store",
                spec={"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
            )
        )
    docs += [
        _deployment(install),
        _object(
            "v1",
            "Service",
            install.namespace,
            spec={
                "selector": _labels(),
                # Named by protocol the way meshes read port names: gRPC inside TLS (opaque to a
                # proxy, never parsed as plaintext HTTP/2), and plain HTTP.
                "ports": [
                    {"name": GRPC, "port": GRPC_PORT, "targetPort": GRPC},
                    {"name": METRICS, "port": METRICS_PORT, "targetPort": METRICS},
                ],
            },
        ),
        # One pod at a time may be evicted: a node drain never waits forever on a single replica.
        _object(
            "policy/v1",
            "PodDisruptionBudget",
            install.namespace,
            spec={"maxUnavailable": 1, "selector": {"matchLabels": _labels()}},
        ),
    ]
    return docs


def serve_args(install: Install) -> list[str]:
    """The `meshca serve` flags of the pod (the image's entrypoint is `meshca serve`)."""
    args = [
        f"--dir={TRUST_MOUNT}",
        f"--listen=0.0.0.0:{GRPC_PORT}",
        f"--metrics-listen=0.0.0.0:{METRICS_PORT}",  # kubelet probes the pod's address
        *(f"--server-name={name}" for name in install.server_names),
        "--k8s-api=https://kubernetes.default.svc",
        f"--k8s-api-ca={SA_DIR}/ca.crt",
        f"--k8s-api-token-file={SA_DIR}/token",  # re-read per review: kubelet rotates it
        f"--workers={WORKERS}",  # the default (the node's cores) ignores the pod's CPU limit
    ]
    if not install.store_secret:
        args.append(f"--store=sqlite://{STORE_MOUNT}/meshca.db")
    if install.issuer_ttl is not None:
        args += ["--manage-issuers", f"--issuer-ttl={format_duration(install.issuer_ttl)}"]
    return args


def yaml_stream(docs: Iterable[Doc], header: str) -> str:
    """A YAML stream of JSON documents (JSON is YAML), after a comment, so kubectl reads it as YAML."""
    comment = "".join(f"# {line}\n" for line in header.splitlines())
    return comment + "".join(f"---\n{json.dumps(doc, indent=2)}\n" for doc in docs)


def _deployment(install: Install) -> Doc:
    secret, cert_file, key_file = install.secret
    volumes: list[Doc] = [
        {
            "name": "trust",
            "projected": {
                "sources": [
                    {
                        "secret": {
                            "name": secret,
                            "items": [
                                {"key": "tls.crt", "path": cert_file},
                                # group-readable only: the pod's fsGroup is meshca's group
                                {"key": "tls.key", "path": key_file, "mode": 0o440},
                            ],
                        }
                    },
                    {"configMap": {"name": f"{NAME}-bundle", "items": [{"key": "bundle.pem", "path": "bundle.pem"}]}},
                ],
                "defaultMode": 0o444,
            },
        },
        {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}},  # the workers' Prometheus files
    ]
    mounts: list[Doc] = [
        {"name": "trust", "mountPath": TRUST_MOUNT, "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},  # noqa: S108 (the pod's own emptyDir)
    ]
    env: list[Doc] = []
    if install.store_secret:
        env.append(
            {"name": "MESHCA_STORE", "valueFrom": {"secretKeyRef": {"name": install.store_secret, "key": "url"}}}
        )
    else:
        volumes.append({"name": "store", "persistentVolumeClaim": {"claimName": f"{NAME}-store"}})
        mounts.append({"name": "store", "mountPath": STORE_MOUNT})
    container: Doc = {
        "name": NAME,
        "image": install.image,
        "imagePullPolicy": "IfNotPresent",
        "args": serve_args(install),
        "ports": [
            {"name": GRPC, "containerPort": GRPC_PORT, "protocol": "TCP"},
            {"name": METRICS, "containerPort": METRICS_PORT, "protocol": "TCP"},
        ],
        "livenessProbe": _probe("/livez"),
        "readinessProbe": _probe("/readyz"),
        "resources": {"requests": {"cpu": "250m", "memory": "256Mi"}, "limits": {"cpu": "2", "memory": "512Mi"}},
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": mounts,
    }
    if env:
        container["env"] = env
    pod = {
        "metadata": {
            "labels": _labels(),
            "annotations": {
                # The CA of the mesh cannot sit behind the mesh's own proxies.
                "linkerd.io/inject": "disabled",
                "sidecar.istio.io/inject": "false",
                "prometheus.io/scrape": "true",
                "prometheus.io/port": str(METRICS_PORT),
            },
        },
        "spec": {
            "serviceAccountName": NAME,
            "automountServiceAccountToken": True,  # the TokenReview credential
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": UID,
                "runAsGroup": UID,
                "fsGroup": UID,
                "fsGroupChangePolicy": "OnRootMismatch",
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "topologySpreadConstraints": [
                _spread("kubernetes.io/hostname", "DoNotSchedule"),
                _spread("topology.kubernetes.io/zone", "ScheduleAnyway"),
            ],
            "terminationGracePeriodSeconds": 30,
            "containers": [container],
            "volumes": volumes,
        },
    }
    # SQLite on a ReadWriteOnce volume: the old pod stops before the new one opens the file.
    strategy = (
        {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
        if install.store_secret
        else {"type": "Recreate"}
    )
    return _object(
        "apps/v1",
        "Deployment",
        install.namespace,
        spec={
            "replicas": install.replicas,
            "selector": {"matchLabels": _labels()},
            "strategy": strategy,
            "template": pod,
        },
    )


def _probe(path: str) -> Doc:
    return {"httpGet": {"path": path, "port": METRICS}, "periodSeconds": 10, "timeoutSeconds": 2}


def _spread(key: str, when: str) -> Doc:
    return {"maxSkew": 1, "topologyKey": key, "whenUnsatisfiable": when, "labelSelector": {"matchLabels": _labels()}}


def _labels() -> dict[str, str]:
    return {"app.kubernetes.io/name": NAME}


def _object(
    api_version: str, kind: str, namespace: str, *, name: str = NAME, namespaced: bool = True, **body: Any
) -> Doc:
    metadata: Doc = {"name": name, "labels": _labels()}
    if namespaced:
        metadata["namespace"] = namespace
    return {"apiVersion": api_version, "kind": kind, "metadata": metadata, **body}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
