"""The controller daemon: a ``Controller`` recorded in the store, served on the socket.

Rooms: ``recording`` (the controller's ``Recorder``: store, ``events.jsonl``,
``logs/``), ``hooks`` (event hooks), ``purging`` (purges and retention), ``ops``
(the socket's op table and handlers), ``feeds`` (what ``mnp run`` clients are
streamed), ``core`` (``Service``, which puts them together).

Every job the service accepts is written to SQLite (``mnp.store``), every state
change appended to the store and to ``$MNP_HOME/events.jsonl``, every task's output
to ``$MNP_HOME/logs/JOB/TID.out|err``. Writes are batched and flushed every
``FLUSH_EVERY`` seconds, and at once before ``submit`` answers (an accepted job is
durable) and before ``run`` and ``wait`` answer with a job's end (what the client
reads next shows it). Reads (``list``, ``describe``, ``events``, ``logs``) do not go through
here: the CLI and ``mnp.Client`` (``mnp.client``) open the store read-only and the
log files directly. The inventory's ``[[notifications]]`` hooks are given each event
once committed (``hooks``).

Disk and permission faults never raise into the controller's loop:

- a write that fails (a full disk, a locked database) stays buffered and is
  tried again every ``RETRY_EVERY`` seconds; ``events.jsonl`` gets only what the
  store has committed, and catches up from the store at start;
- a submit is answered only once its job is committed; if that fails the job is
  withdrawn (never started, never half-recorded) and the client is told why;
- a task starts only once its log folder takes files (else its attempt fails with
  ``Cannot write logs: PATH: ERROR``); output that cannot be written later is
  dropped, and the job's final reason ends with ``Output lost: PATH: ERROR``.

The control socket's ops (the wire is in ``mnp.api``; the table is
``mnp.service.ops.socket_ops``, and a unit test holds it to this list):

- ``ping`` → ``pid``, ``started``, ``uptime``, ``home`` (the daemon's; an error once stopping)
- ``shutdown`` → ``pid``, ``stopping``: the controller stops (the daemon's)
- ``submit`` {``definition``, ``source``} → ``job_id``, ``warnings``, once committed
- ``run`` {``definition``, ``source``} → ``job_id``, then output messages
  (``out``, ``fd``, ``tid``, ``label``), then how the job ended (as ``wait``);
  {``argv``, ``submitter``} in place of the definition: ``mnp run``'s command line
  and the client's ``cwd``, ``environ``, ``prefix``, ``base_prefix``, built here
  by the ``run`` command (``mnp.quickrun``)
- ``wait`` {``job_id``} → ``state``, ``reason``, ``exit_code``, ``timings`` once it ends
- ``cancel`` {``job_id``, ``reason``} → ``job_id``, ``name``, ``state``
- ``terminate`` {``job_id``, ``reason``} → ``job_id``, ``name``, ``state``
- ``purge`` {``older_than``, ``state``} → ``job_ids``, ``log_errors``
- ``register`` {``definition``, ``source``} → ``name``, ``revision``: stored, committed
- ``deregister`` {``name``, ``revision``} → ``name``, ``revision``, ``status`` (INACTIVE)
- ``info`` → ``inventory``, ``hosts``, ``warnings``
- ``hosts`` → ``hosts``: each host's capacity, what is free, its load
- ``queues`` → ``queues``: each queue with its jobs counted by state
- ``drain`` {``names``, ``reason``} → ``hosts``: they take no new work (running work goes on)
- ``resume`` {``names``} → ``hosts``: they take work again
- ``ce`` → ``compute_environments``: each with its state, hosts and (managed) allocations
- ``ce_update`` {``name``, ``state``, ``min_vcpus``, ``max_vcpus``, ``desired_vcpus``} → ``change``
- ``queue_update`` {``name``, ``priority``, ``state``} → ``change``
- ``reload`` → ``hosts_added``, ``hosts_removed``, ``hosts_changed``, ``ces``, ``queues``:
  the inventory file read again (running jobs untouched; removed hosts drained first)
"""

from mnp.service.core import Service, make_handler_factory
from mnp.service.ops import RUN_BUFFER, socket_ops
from mnp.service.recording import DB_CHECK_EVERY, FLUSH_EVERY, RETRY_EVERY

__all__ = [
    "DB_CHECK_EVERY",
    "FLUSH_EVERY",
    "RETRY_EVERY",
    "RUN_BUFFER",
    "Service",
    "make_handler_factory",
    "socket_ops",
]
