"""Byte streams to node agents: ``local`` (a subprocess) and ``ssh`` (asyncssh)."""

from mnp.transport.base import AgentConnection, AgentStream, Transport

__all__ = ["AgentConnection", "AgentStream", "Transport"]
