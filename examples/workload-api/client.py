"""A workload that knows only py-spiffe: its SVIDs, a JWT-SVID and its validation, from SPIFFE_ENDPOINT_SOCKET."""

import time

from spiffe import WorkloadApiClient
from spiffe.workloadapi.errors import FetchX509SvidError

with WorkloadApiClient() as client:
    # Right after it starts the agent may not have reached the service yet (UNAVAILABLE) or may still be
    # signing: wait for both SVIDs (bounded), as a SPIFFE client retries.
    svids = []
    for _ in range(50):
        try:
            svids = client.fetch_x509_svids(timeout=10)
        except FetchX509SvidError:
            svids = []
        if len(svids) == 2:
            break
        time.sleep(0.2)
    for svid in sorted(svids, key=lambda s: str(s.spiffe_id)):
        print(f"X.509-SVID {svid.spiffe_id} valid until {svid.leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")
    jwt = client.fetch_jwt_svid(audience={"orders"}, subject=svids[0].spiffe_id)
    checked = client.validate_jwt_svid(jwt.token, "orders")
    print(f"JWT-SVID for {jwt.spiffe_id}, audience {sorted(jwt.audience)}: validated as {checked.spiffe_id}")
