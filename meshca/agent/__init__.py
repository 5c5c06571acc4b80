"""The node agent: attests local processes and serves them the SPIFFE Workload API (docs/architecture.md)."""

from meshca.agent._agent import AgentConfig, NodeAgent
from meshca.agent._attest import PeerCredentials, peer_credentials, selectors_of
from meshca.agent._metrics import AgentMetrics

__all__ = ["AgentConfig", "AgentMetrics", "NodeAgent", "PeerCredentials", "peer_credentials", "selectors_of"]
