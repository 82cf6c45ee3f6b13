"""The controller: one asyncio loop that applies scheduling decisions through agents.

Rooms (``ARCHITECTURE.md`` draws them):

- ``core``: ``Controller`` -- jobs, their attempts and the run queue; it asks
  ``mnp.sched.decide`` where runnable jobs start and ``mnp.sched.lifecycle`` what
  happens next to a job, and applies the answers (state changes, spawns, teardown);
- ``hosts``: ``HostPool`` -- one agent connection per host, its capacity, heartbeat,
  reconnects; it knows no jobs.
"""

from mnp.controller.core import (
    LOST_REASON,
    Controller,
    LaunchError,
    Recorder,
    Restored,
    ipv4_literal,
)
from mnp.controller.hosts import HostPool, heartbeat_from_env

__all__ = [
    "LOST_REASON",
    "Controller",
    "HostPool",
    "LaunchError",
    "Recorder",
    "Restored",
    "heartbeat_from_env",
    "ipv4_literal",
]
