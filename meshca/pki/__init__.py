"""The PKI core: SPIFFE IDs, keys, certificate profiles, CSR checks, the issuer, bundles and verification.

This layer knows nothing of gRPC, stores or processes; the server, the client
and the CLI build on it (docs/architecture.md). Its public names are
re-exported by `meshca`; import them from there.
"""
