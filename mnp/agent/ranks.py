"""MPI ranks started by this agent (direct MPI launch, issue 16): each rank's PMI socket
wired to its job node's ``NodeServer`` (pmi.py) in the agent's epoll loop.

A `spawn` with a ``pmi`` part (PROTOCOL.md) is a rank: the agent makes a socketpair,
the rank inherits one end as ``PMI_FD`` and the node's server reads the other. One
server per (kvsname, job node): on the local default several job nodes share one
agent, each its own node. What the server reports goes to the controller:

- ``pmi_barrier``: every local rank of the node is in ``barrier_in``, with their puts;
  the controller merges every node's (``mnp.pmi.exchange``) and answers ``pmi_release``;
- ``pmi_fail``: a rank called ``abort``, closed its PMI connection (exited) before
  ``finalize``, or did not send ``init`` within the bound; the controller ends the job.

A rank's socket is drained when its main process is reaped, before its `exited`, so a
rank that aborted or died before finalize is reported first. When the last rank of a
node is gone, the ``/dev/shm`` segments MPICH names after the kvsname are removed
(``pmi.shm_leftovers``): killed ranks leave them behind.
"""

from __future__ import annotations

import functools
import os
import select
import socket
import time

from .pmi import NEW, NodeServer, shm_leftovers
from .request import BadRequest

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs milliseconds to import; annotations are strings here
    from typing import Any, Dict, Hashable, Optional, Tuple

    from .agent import Agent
    from .loop import Timer
    from .tasks import Task

SEND_WITHIN = 5.0  # seconds an answer may wait for room in a rank's socket
READ_SIZE = 65536


class _Node:
    """One job node's ranks on this agent."""

    def __init__(self, kvsname: str, node: int, node_id: int) -> None:
        self.kvsname = kvsname
        self.node = node
        self.node_id = node_id
        self.server: Optional[NodeServer] = None
        self.tids: Dict[int, str] = {}  # rank -> tid
        self.live: Dict[str, int] = {}  # tid -> rank, until gone
        self.codes: Dict[int, Optional[int]] = {}  # rank -> exit status, once reaped
        self.timer: Optional[Timer] = None
        self.failed = False  # one pmi_fail per node is enough
        self.within = 0.0  # seconds its ranks have to send `init`
        self.listener: Optional[socket.socket] = None  # PMI_PORT: ranks in containers


class Ranks:
    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.nodes: Dict[Tuple[str, int], _Node] = {}
        self.by_fd: Dict[int, Tuple[_Node, socket.socket, str]] = {}  # our end -> ..., tid
        self.by_tid: Dict[str, Tuple[_Node, int, Optional[int]]] = {}  # tid -> node, rank, fd

    # ---------------------------------------------------------------- spawn

    def prepare(
        self, tid: str, pmi: Any, env: Dict[str, str], port: bool = False
    ) -> Optional[socket.socket]:
        """Check the ``pmi`` part of a spawn, attach the rank to its node's server and
        return the end of its socketpair the rank inherits (``PMI_FD`` set in ``env``);
        the caller closes it once the rank is started (or not).

        With `port` (the rank runs in a container, which cannot inherit a descriptor
        under every runtime: docker has no way) the rank connects instead: ``PMI_PORT``
        is its node server's listening socket on 127.0.0.1 (the container shares the
        host's network) and ``PMI_ID`` its rank, which MPICH sends as ``initack`` once
        connected; returns None."""
        if not isinstance(pmi, dict):
            raise BadRequest("pmi must be an object")
        kvsname = _field(pmi, "kvsname", str)
        node = _field(pmi, "node", int)
        node_id = _field(pmi, "node_id", int)
        rank = _field(pmi, "rank", int)
        size = _field(pmi, "size", int)
        within = pmi.get("init_within", 60)
        appnums = pmi.get("appnums")
        attrs = pmi.get("attrs", {})
        if not kvsname or " " in kvsname or "=" in kvsname or len(kvsname) > 200:
            raise BadRequest("pmi.kvsname must be a word of 1..200 characters")
        if not (
            isinstance(appnums, dict)
            and all(k.isdigit() and isinstance(v, int) for k, v in appnums.items())
        ):
            raise BadRequest("pmi.appnums must map this node's ranks to application numbers")
        if not (
            isinstance(attrs, dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in attrs.items())
        ):
            raise BadRequest("pmi.attrs must map names to strings")
        if not isinstance(within, (int, float)) or isinstance(within, bool) or within <= 0:
            raise BadRequest("pmi.init_within must be a positive number of seconds")
        if str(rank) not in appnums or not 0 <= rank < size:
            raise BadRequest("pmi.rank %d is not one of this node's ranks" % rank)
        key = (kvsname, node)
        n = self.nodes.get(key)
        if n is None:
            n = self.nodes[key] = _Node(kvsname, node, node_id)
            n.within = float(within)
            n.server = NodeServer(
                kvsname,
                size,
                {int(r): a for r, a in appnums.items()},
                attrs,
                self._send,
                functools.partial(self._barrier, n),
                functools.partial(self._abort, n),
                functools.partial(self._lost, n),
            )
            n.timer = self.agent.loop.call_later(
                float(within), functools.partial(self._init_due, n)
            )
        if rank in n.tids:
            raise BadRequest("pmi.rank %d of %s is already on this agent" % (rank, kvsname))
        if port:
            if n.listener is None:
                n.listener = self._listen(n)
            n.tids[rank] = tid
            n.live[tid] = rank
            self.by_tid[tid] = (n, rank, None)
            env.pop("PMI_FD", None)
            env["PMI_PORT"] = "127.0.0.1:%d" % n.listener.getsockname()[1]
            env["PMI_ID"] = str(rank)
            return None
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        assert n.server is not None
        n.server.attach(ours.fileno(), rank)
        n.tids[rank] = tid
        n.live[tid] = rank
        self.by_fd[ours.fileno()] = (n, ours, tid)
        self.by_tid[tid] = (n, rank, ours.fileno())
        self.agent.loop.add_reader(ours.fileno(), functools.partial(self._readable, ours.fileno()))
        os.set_inheritable(theirs.fileno(), True)
        env["PMI_FD"] = str(theirs.fileno())
        return theirs

    def _listen(self, n: _Node) -> socket.socket:
        """The node server's socket for ranks that connect (``PMI_PORT``)."""
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sock.listen(128)
        except OSError as e:
            raise BadRequest("cannot listen for PMI connections on 127.0.0.1: %s" % e) from None
        sock.setblocking(False)
        self.agent.loop.add_reader(sock.fileno(), functools.partial(self._accept, n, sock))
        return sock

    def _accept(self, n: _Node, sock: socket.socket) -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            if n.server is None:
                conn.close()
                continue
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            fd = conn.fileno()
            n.server.attach(fd)  # its rank comes with `initack pmiid=`
            self.by_fd[fd] = (n, conn, "")
            self.agent.loop.add_reader(fd, functools.partial(self._readable, fd))

    def _fd_of(self, tid: str) -> Optional[int]:
        """The descriptor of the rank `tid`'s PMI connection, if open."""
        found = self.by_tid.get(tid)
        if found is None:
            return None
        n, rank, fd = found
        if fd is None and n.listener is not None and n.server is not None:
            conn = n.server.bound.get(rank)
            if isinstance(conn, int) and conn in self.by_fd:
                return conn
        return fd

    def spawn_failed(self, tid: str) -> None:
        """The rank never started (its `exited` and `gone` are sent by the spawn)."""
        self._close(self._fd_of(tid))
        self._forget(tid)

    # ---------------------------------------------------------------- reading

    def _readable(self, fd: int) -> None:
        found = self.by_fd.get(fd)
        if found is None:
            return
        n, _, tid = found
        if not tid and n.server is not None:  # PMI_PORT: known once identified
            c = n.server.conns.get(fd)
            tid = n.tids.get(c.rank, "") if c is not None and c.rank is not None else ""
        try:
            data = os.read(fd, READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            task = self.agent.tasks.get(tid)
            if task is not None and not task.reaped:
                # closed by a rank that is exiting: reported at its exit, with its status
                self.agent.loop.remove(fd)
                return
            self._close(fd)
            return
        assert n.server is not None
        n.server.feed(fd, data)

    def _drain(self, fd: int) -> None:
        """Everything the rank wrote, up to the end if it has closed its end."""
        while fd in self.by_fd:
            n = self.by_fd[fd][0]
            try:
                data = os.read(fd, READ_SIZE)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self._close(fd)
                return
            assert n.server is not None
            n.server.feed(fd, data)

    def _close(self, fd: Optional[int]) -> None:
        if fd is None:
            return
        found = self.by_fd.pop(fd, None)
        if found is None:
            return
        n, sock, _ = found
        self.agent.loop.remove(fd)
        assert n.server is not None
        n.server.closed(fd)  # before finalize: _lost reports it
        for tid, (node, rank, rfd) in list(self.by_tid.items()):
            if rfd == fd:
                self.by_tid[tid] = (node, rank, None)
        sock.close()

    def _send(self, conn: Hashable, data: bytes) -> None:
        fd = conn
        assert isinstance(fd, int)
        view = memoryview(data)
        deadline = time.monotonic() + SEND_WITHIN
        while view:
            try:
                view = view[os.write(fd, view) :]
            except BlockingIOError:
                left = deadline - time.monotonic()
                if left <= 0:
                    return  # the rank reads none of its answers: it gets no more
                select.select([], [fd], [], left)
            except OSError:
                return  # gone; its closing is noticed by the reader

    # ---------------------------------------------------------------- what ranks do

    def _barrier(self, n: _Node, epoch: int, puts: Dict[str, str]) -> None:
        tid = next(iter(n.live), "")
        self.agent.out.emit(
            {
                "ev": "pmi_barrier",
                "tid": tid,
                "kvsname": n.kvsname,
                "node": n.node,
                "epoch": epoch,
                "puts": puts,
                "t": time.time(),
            }
        )

    def _fail(self, n: _Node, rank: int, code: Optional[int], reason: str) -> None:
        if n.failed:
            return
        n.failed = True
        self.agent.out.emit(
            {
                "ev": "pmi_fail",
                "tid": n.tids.get(rank, ""),
                "kvsname": n.kvsname,
                "node": n.node,
                "rank": rank,
                "code": code,
                "reason": reason,
                "t": time.time(),
            }
        )

    def _abort(self, n: _Node, rank: int, code: int, message: str) -> None:
        said = " ".join(message.split())[:200]
        self._fail(
            n,
            rank,
            code,
            "MPI rank %d (task %s, node %d) called MPI_Abort with code %d%s"
            % (rank, n.tids.get(rank, "?"), n.node, code, ": " + said if said else ""),
        )

    def _lost(self, n: _Node, rank: int, phase: str) -> None:
        code = n.codes.get(rank)
        how = "ended" if code is None else "exited with code %d" % code
        when = "before MPI_Init" if phase == NEW else "before MPI_Finalize"
        self._fail(
            n,
            rank,
            code,
            "MPI rank %d (task %s, node %d) %s %s"
            % (rank, n.tids.get(rank, "?"), n.node, how, when),
        )

    def _init_due(self, n: _Node) -> None:
        n.timer = None
        if n.server is None:
            return
        late = [r for r in n.server.not_initialized() if n.tids.get(r) in n.live]
        if late:
            self._fail(
                n,
                late[0],
                None,
                "MPI rank %d (task %s, node %d) did not reach MPI_Init (PMI init) within %gs"
                % (late[0], n.tids.get(late[0], "?"), n.node, n.within),
            )

    # ---------------------------------------------------------------- controller ops

    def release(self, msg: Dict[str, Any]) -> None:
        kvsname = _field(msg, "kvsname", str)
        epoch = _field(msg, "epoch", int)
        nodes = msg.get("nodes")
        kvs = msg.get("kvs")
        if not (isinstance(nodes, list) and all(isinstance(x, int) for x in nodes)):
            raise BadRequest("nodes must be a list of job node indices")
        if kvs is not None and not (
            isinstance(kvs, dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in kvs.items())
        ):
            raise BadRequest("kvs must map keys to strings, or be null (the barrier failed)")
        for node in nodes:
            n = self.nodes.get((kvsname, node))
            if n is None or n.server is None:
                continue  # its ranks are gone already
            try:
                n.server.release(epoch, kvs)
            except ValueError as e:
                raise BadRequest(str(e)) from None

    # ---------------------------------------------------------------- ends

    def exited(self, task: Task, code: Optional[int], sig: Optional[int]) -> None:
        """A rank's main process was reaped: note its status and read what it wrote last."""
        found = self.by_tid.get(task.tid)
        if found is None:
            return
        n, rank, _ = found
        n.codes[rank] = code if code is not None else 128 + (sig or 0)
        fd = self._fd_of(task.tid)
        if fd is not None:
            self._drain(fd)
        elif n.listener is not None and n.server is not None and rank not in n.server.bound:
            self._lost(n, rank, NEW)  # PMI_PORT: it never connected

    def gone(self, task: Task) -> None:
        if task.tid not in self.by_tid:
            return
        self._close(self._fd_of(task.tid))
        self._forget(task.tid)

    def _forget(self, tid: str) -> None:
        found = self.by_tid.pop(tid, None)
        if found is None:
            return
        n = found[0]
        n.live.pop(tid, None)
        if n.live:
            return
        self.agent.loop.cancel(n.timer)
        n.server = None
        self._unlisten(n)
        self.nodes.pop((n.kvsname, n.node), None)
        for path in shm_leftovers(n.kvsname, n.node_id):
            try:
                os.unlink(path)
            except OSError:
                pass

    def _unlisten(self, n: _Node) -> None:
        """Close the node's listening socket and what connected but never said its rank."""
        if n.listener is None:
            return
        self.agent.loop.remove(n.listener.fileno())
        n.listener.close()
        n.listener = None
        for fd, (node, _, _) in list(self.by_fd.items()):
            if node is n:
                self._close(fd)

    def close_all(self) -> None:
        for fd in list(self.by_fd):
            self._close(fd)
        for n in list(self.nodes.values()):
            self._unlisten(n)


def _field(msg: Dict[str, Any], key: str, kind: type) -> Any:
    value = msg.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise BadRequest("%s must be %s" % (key, "a string" if kind is str else "an integer"))
    return value
