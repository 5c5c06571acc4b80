"""Kubernetes service-account subjects map to exactly one SPIFFE ID, or to none."""

from __future__ import annotations

import pytest

import meshca
from meshca.server import service_account_id

TD = meshca.TrustDomain("example.org")


def test_a_service_account_maps_to_its_spiffe_id() -> None:
    assert service_account_id(TD, "system:serviceaccount:payments:web.v2") == meshca.SpiffeId.parse(
        "spiffe://example.org/ns/payments/sa/web.v2"
    )


@pytest.mark.parametrize(
    "subject",
    [
        "system:serviceaccount:ns:sa/extra",
        "system:serviceaccount:ns/x:sa",
        "system:serviceaccount:ns",
        "system:serviceaccount::sa",
        "system:serviceaccount:ns:",
        "system:node:worker-1",
        "user@example.org",
        "system:serviceaccount:ns:sa:extra",
        "system:serviceaccount:ns:SA%20",
    ],
)
def test_other_subjects_are_refused(subject: str) -> None:
    with pytest.raises(meshca.AuthenticationError) as refused:
        service_account_id(TD, subject)
    assert refused.value.reason == "not_service_account"
