"""Renewal by proof of possession of a current SVID (see `meshca.pki._proof`)."""

from __future__ import annotations

from collections.abc import Callable

from meshca.pki._proof import verify_svid_proof
from meshca.pki._time import Clock
from meshca.pki._verify import BundleSource
from meshca.server.credentials._base import Presented, Principal, SvidPossession, grant

__all__ = ["SvidProofCredential"]


class SvidProofCredential:
    """The proof grants the SPIFFE ID of the SVID it was made with, and nothing else.

    A node agent renews its own SVID this way: a proof made with an agent SVID
    grants exactly that agent ID; every other reserved ID stays refused.
    """

    def __init__(self, bundles: Callable[[], BundleSource], clock: Clock) -> None:
        self._bundles = bundles  # read per request: a reload may change the bundle
        self._clock = clock

    async def principal(self, presented: Presented) -> Principal | None:
        if not isinstance(presented, SvidPossession):
            return None
        sid = verify_svid_proof(presented.proof, presented.csr_der, self._bundles(), now=self._clock())
        return grant("svid", f"svid:{sid}", sid, agent=sid.is_agent)
