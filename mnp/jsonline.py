"""Compact JSON for the controller's hot paths: the agent's encoder (``mnp.agent.jsonline``,
standard library only, so that it ships with the agent), made once and reused."""

from mnp.agent.jsonline import dumps as dumps
