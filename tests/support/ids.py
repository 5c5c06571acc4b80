"""The names the tests use: one trust domain, a few workloads, the server's own identity."""

from __future__ import annotations

import meshca

TD = "example.org"
WEB = meshca.SpiffeId.parse(f"spiffe://{TD}/ns/default/sa/web")
API = meshca.SpiffeId.parse(f"spiffe://{TD}/ns/default/sa/api")
OTHER = meshca.SpiffeId.parse(f"spiffe://{TD}/ns/default/sa/other")
SERVER_ID = meshca.SpiffeId.parse(f"spiffe://{TD}/meshca/identity")
LINKERD_WEB = f"web.default.serviceaccount.identity.linkerd.{TD}"
K8S_ISSUER = "https://kubernetes.default.svc.cluster.local"

SERVER_NAME = "localhost"  # the DNS name in the identity server's certificate; sources dial 127.0.0.1
