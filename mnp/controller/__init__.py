"""The controller: one asyncio loop that applies scheduling decisions through agents.

Rooms (``ARCHITECTURE.md`` draws them):

- ``core``: ``Controller`` -- jobs, their attempts and the run queue; it asks
  ``mnp.sched.decide`` where runnable jobs start and ``mnp.sched.lifecycle`` what
  happens next to a job, and applies the answers (state changes, spawns, teardown);
- ``launch``: ``Launcher`` -- a placement into each task's argv, environment and
  files (``mnp.wiring``), after what must be asked first: secrets, port, IPv4;
- ``hosts``: ``HostPool`` -- one agent connection per host, its capacity, heartbeat,
  reconnects; it knows no jobs.
"""

from mnp.controller.core import LOST_REASON, Controller, Recorder, Restored
from mnp.controller.hosts import HostPool, heartbeat_from_env
from mnp.controller.launch import Launcher, LaunchError, ipv4_literal

__all__ = [
    "LOST_REASON",
    "Controller",
    "HostPool",
    "LaunchError",
    "Launcher",
    "Recorder",
    "Restored",
    "heartbeat_from_env",
    "ipv4_literal",
]
