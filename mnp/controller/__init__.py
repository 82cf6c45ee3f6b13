"""The controller: one asyncio loop that applies scheduling decisions through agents.

Rooms (``ARCHITECTURE.md`` draws them); the middle three share one ``state.Shared``
and never import ``core``, which makes them:

- ``core``: ``Controller`` -- the public API (submit, cancel, terminate, wait,
  restore, close) that the service and ``mnp run`` call;
- ``admission``: ``Admission`` -- ids, dependencies, array admission, restore, and
  a job's end: what ``mnp.sched.lifecycle`` decides before a job runs, applied;
- ``starting``: ``Starter`` -- the scheduling pass (``mnp.sched.decide``) and each
  placed attempt's spawns, the main node of a multi-node job first;
- ``attempts``: ``Attempts`` -- the agents' events about running tasks, timeouts,
  teardown, retry or finish (``mnp.sched.lifecycle``), one job's failure kept its own;
- ``launch``: ``Launcher`` -- a placement into each task's argv, environment and
  files (``mnp.wiring``), after what must be asked first: secrets, port, IPv4;
- ``hosts``: ``HostPool`` -- one agent connection per host, its capacity, heartbeat,
  reconnects; it knows no jobs;
- ``state``: ``Shared`` and the ``Recorder`` protocol -- what the rooms share.
"""

from mnp.controller.core import LOST_REASON, Controller, Recorder, Restored, tune_gc
from mnp.controller.hosts import HostPool, heartbeat_from_env
from mnp.controller.launch import Launcher, LaunchError, ipv4_literal

__all__ = [
    "LOST_REASON",
    "Controller",
    "HostPool",
    "LaunchError",
    "Launcher",
    "tune_gc",
    "Recorder",
    "Restored",
    "heartbeat_from_env",
    "ipv4_literal",
]
