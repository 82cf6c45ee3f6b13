"""The PMI-1 "simple" wire protocol, served by a node's agent to the MPI ranks it started.

Reference: MPICH ``src/pmi`` (``pmi-1.1.txt``, ``pmi_v1.c``) and Flux RFC 13 /
flux-core ``simple_server.c``. MPICH's client (the ``mpich`` wheel included)
opens with ``cmd=init pmi_version=1 pmi_subversion=1``; the server answers 1.1,
so the client keeps to plain ``barrier_in`` (no 1.2 group barriers, no
threading). PMI-2's wire protocol is refused at ``init`` with an error.

``NodeServer`` is sans-I/O: its owner feeds it the bytes each rank wrote and
gives it a ``send`` for the answers, so the agent's epoll loop drives it
without asyncio, whose import alone would cost the agent's start tens of
milliseconds (the tests drive it with asyncio: ``tests/pmi_harness.py``). One
instance serves the ranks of one job on one node:

- puts are collected on the node; when every local rank is in ``barrier_in``,
  ``on_barrier(epoch, puts)`` hands them over (the agent sends them to the
  controller); ``release(epoch, kvs)`` with the merged key-value space of that
  barrier answers ``barrier_out`` to each local rank, and later ``get``\\ s are
  served from everything released so far plus the job attributes;
- ``abort`` and a rank closing its connection before ``finalize`` are reported
  through ``on_abort(rank, code, message)`` and ``on_lost(rank, phase)``.

A line that is not the protocol gets an error answer (``rc=-1 msg=...``) and
the server goes on; a ``kvsname`` other than the job's is refused, so a rank
can never read another job's keys.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs milliseconds to import; annotations are strings here
    from typing import Any, Callable, Dict, Hashable, List, Mapping, Optional, Set

KVSNAME_MAX = 256  # Hydra's limits; MPICH sizes its buffers from `get_maxes`
KEYLEN_MAX = 64
VALLEN_MAX = 1024
LINE_MAX = 4096  # longer than any valid line; a longer one is an error, not a buffer

# the answer command of each query (pmi-1.1.txt); `abort` has none
ANSWER = {
    "init": "response_to_init",
    "initack": "initack",
    "get_maxes": "maxes",
    "get_appnum": "appnum",
    "get_my_kvsname": "my_kvsname",
    "get_universe_size": "universe_size",
    "put": "put_result",
    "get": "get_result",
    "barrier_in": "barrier_out",
    "finalize": "finalize_ack",
    "publish_name": "publish_result",
    "unpublish_name": "unpublish_result",
    "lookup_name": "lookup_result",
}

# phases of a rank, as `on_lost` names them
NEW = "before init"
RUNNING = "after init, before finalize"
DONE = "finalized"
ABORTED = "aborted"


class ProtocolError(Exception):
    """A line that is not a valid query; its message goes back as `msg=`."""


def parse(line: str) -> Dict[str, str]:
    """``cmd=put kvsname=k key=a value=b`` -> its attributes; ProtocolError if malformed."""
    attrs: Dict[str, str] = {}
    for word in line.split(" "):
        if not word:
            continue
        key, eq, value = word.partition("=")
        if not eq or not key:
            raise ProtocolError("expected-key=value-words")
        if key in attrs:
            raise ProtocolError("repeated-" + _safe(key))
        attrs[key] = value
    if "cmd" not in attrs and "mcmd" not in attrs:
        raise ProtocolError("expected-cmd=")
    return attrs


def _safe(text: str) -> str:
    """Text fit for one word of an answer: no spaces, `=` or control characters."""
    kept = "".join(c if c.isprintable() and c not in " =" else "?" for c in text)
    return kept[:64] or "?"


def line(cmd: str, **attrs: Any) -> bytes:
    return (" ".join(["cmd=" + cmd] + ["%s=%s" % kv for kv in attrs.items()]) + "\n").encode()


class _Conn:
    __slots__ = ("rank", "buf", "in_mcmd")

    def __init__(self, rank: Optional[int]) -> None:
        self.rank = rank
        self.buf = b""
        self.in_mcmd = False


class NodeServer:
    """The PMI server of one job's ranks on one node; see the module docstring."""

    def __init__(
        self,
        kvsname: str,
        size: int,
        appnums: Mapping[int, int],
        jobattrs: Mapping[str, str],
        send: Callable[[Hashable, bytes], None],
        on_barrier: Callable[[int, Dict[str, str]], None],
        on_abort: Callable[[int, int, str], None],
        on_lost: Callable[[int, str], None],
    ) -> None:
        self.kvsname = kvsname
        self.size = size
        self.appnums = dict(appnums)  # the local ranks and their application numbers
        self.kvs: Dict[str, str] = dict(jobattrs)
        self.send = send
        self.on_barrier = on_barrier
        self.on_abort = on_abort
        self.on_lost = on_lost
        self.conns: Dict[Hashable, _Conn] = {}
        self.phase: Dict[int, str] = {r: NEW for r in appnums}
        self.bound: Dict[int, Hashable] = {}  # rank -> its connection
        self.puts: Dict[str, str] = {}  # this epoch's puts of the local ranks
        self.waiting: Set[int] = set()  # local ranks in barrier_in
        self.epoch = 0  # barriers completed
        self.pending = False  # on_barrier called, release not yet

    # ---- connections -----------------------------------------------------

    def attach(self, conn: Hashable, rank: Optional[int] = None) -> None:
        """A rank's connection: with its rank (``PMI_FD``) or not yet known (``PMI_PORT``)."""
        if rank is not None:
            try:
                self._bind(rank, conn)
            except ProtocolError as e:
                raise ValueError(str(e)) from None
        self.conns[conn] = _Conn(rank)

    def _bind(self, rank: int, conn: Hashable) -> None:
        if rank not in self.appnums:
            raise ProtocolError("rank-%d-is-not-on-this-node" % rank)
        if rank in self.bound:
            raise ProtocolError("rank-%d-already-connected" % rank)
        self.bound[rank] = conn

    def closed(self, conn: Hashable) -> None:
        """The connection ended (the rank exited, or closed its PMI descriptor)."""
        c = self.conns.pop(conn, None)
        if c is None or c.rank is None:
            return
        phase = self.phase[c.rank]
        if phase in (NEW, RUNNING):
            self.on_lost(c.rank, phase)

    def feed(self, conn: Hashable, data: bytes) -> None:
        """Bytes a rank wrote; each whole line is answered before this returns."""
        c = self.conns[conn]
        c.buf += data
        while b"\n" in c.buf:
            raw, _, c.buf = c.buf.partition(b"\n")
            self._line(conn, c, raw)
        if len(c.buf) > LINE_MAX:
            c.buf = b""
            self.send(conn, line("error", rc=-1, msg="line-too-long"))

    def not_initialized(self) -> List[int]:
        """Local ranks that have not sent ``init`` yet (the agent bounds how long they may take)."""
        return sorted(r for r, p in self.phase.items() if p == NEW)

    # ---- queries ---------------------------------------------------------

    def _line(self, conn: Hashable, c: _Conn, raw: bytes) -> None:
        if c.in_mcmd:  # a spawn request runs to `endcmd`: refused as a whole
            if raw.strip() == b"endcmd":
                c.in_mcmd = False
                self.send(conn, line("spawn_result", rc=-1, msg="spawn-not-supported"))
            return
        cmd = "error"
        try:
            if len(raw) > LINE_MAX:
                raise ProtocolError("line-too-long")
            try:
                text = raw.decode("ascii")
            except UnicodeDecodeError:
                raise ProtocolError("not-ascii") from None
            text = text.rstrip("\r")
            if text.startswith("cmd=abort "):
                # MPICH writes its abort message unescaped, spaces and all: an
                # abort must be reported whatever it says
                head, _, message = text.partition(" message=")
                attrs = parse(head)
                attrs["message"] = message
            else:
                attrs = parse(text)
            if "mcmd" in attrs:
                c.in_mcmd = True
                return
            cmd = attrs["cmd"]
            answer = self._query(conn, c, cmd, attrs)
        except ProtocolError as e:
            self.send(conn, line(ANSWER.get(cmd, "error"), rc=-1, msg=str(e)))
            return
        if answer:
            self.send(conn, answer)

    def _query(self, conn: Hashable, c: _Conn, cmd: str, a: Dict[str, str]) -> bytes:
        if cmd == "initack":
            if c.rank is not None:
                raise ProtocolError("already-identified")
            rank = _int(a, "pmiid")
            self._bind(rank, conn)
            c.rank = rank
            return (
                line("initack")
                + line("set", size=self.size)
                + line("set", rank=rank)
                + (line("set", debug=0))
            )
        if c.rank is None:
            raise ProtocolError("send-initack-pmiid-first")
        rank = c.rank
        if cmd == "init":
            if _int(a, "pmi_version") != 1:
                raise ProtocolError("only-PMI-1-is-served")
            _int(a, "pmi_subversion")
            self.phase[rank] = RUNNING
            return line("response_to_init", rc=0, pmi_version=1, pmi_subversion=1)
        if cmd == "abort":
            code = a.get("exitcode", a.get("exit_code", "1"))
            self.phase[rank] = ABORTED
            self.on_abort(rank, int(code) if _is_int(code) else 1, a.get("message", ""))
            return b""
        if self.phase[rank] != RUNNING:
            raise ProtocolError("send-init-first" if self.phase[rank] == NEW else "finalized")
        if cmd == "get_maxes":
            return line(
                "maxes", rc=0, kvsname_max=KVSNAME_MAX, keylen_max=KEYLEN_MAX, vallen_max=VALLEN_MAX
            )
        if cmd == "get_appnum":
            return line("appnum", rc=0, appnum=self.appnums[rank])
        if cmd == "get_my_kvsname":
            return line("my_kvsname", rc=0, kvsname=self.kvsname)
        if cmd == "get_universe_size":
            return line("universe_size", rc=0, size=self.size)
        if cmd == "put":
            self._own_kvs(a)
            key, value = _word(a, "key", KEYLEN_MAX), _word(a, "value", VALLEN_MAX)
            self.puts[key] = value
            return line("put_result", rc=0)
        if cmd == "get":
            self._own_kvs(a)
            key = _word(a, "key", KEYLEN_MAX)
            # a local rank's put is seen on its node before the barrier too
            found = self.kvs.get(key, self.puts.get(key))
            if found is None:
                return line("get_result", rc=-1, found="FALSE", msg="key-not-found")
            return line("get_result", rc=0, found="TRUE", value=found)
        if cmd == "barrier_in":
            if rank in self.waiting:
                raise ProtocolError("already-in-barrier")
            self.waiting.add(rank)
            self._maybe_barrier()
            return b""
        if cmd == "finalize":
            self.phase[rank] = DONE
            # a rank that finalizes no longer holds up a barrier of the others
            self._maybe_barrier()
            return line("finalize_ack", rc=0)
        if cmd in ("publish_name", "unpublish_name", "lookup_name"):
            raise ProtocolError("name-service-not-supported")
        raise ProtocolError("unknown-command-" + _safe(cmd))

    def _own_kvs(self, a: Dict[str, str]) -> None:
        name = a.get("kvsname", self.kvsname)  # optional in pmi-1.1.txt
        if name != self.kvsname:
            raise ProtocolError("unknown-kvsname")

    # ---- barriers --------------------------------------------------------

    def _maybe_barrier(self) -> None:
        running = {r for r, p in self.phase.items() if p == RUNNING}
        if self.pending or not self.waiting or not running <= self.waiting:
            return
        if len(self.bound) < len(self.appnums) or any(p == NEW for p in self.phase.values()):
            return  # a rank that has not connected or initialized yet will come
        self.pending = True
        puts, self.puts = self.puts, {}
        self.on_barrier(self.epoch, puts)

    def release(self, epoch: int, kvs: Optional[Mapping[str, str]]) -> None:
        """The merged puts of barrier ``epoch`` (None: it failed): answer ``barrier_out``."""
        if not self.pending or epoch != self.epoch:
            raise ValueError("no barrier %d is waiting on this node" % epoch)
        self.pending = False
        self.epoch += 1
        waiting, self.waiting = sorted(self.waiting), set()
        if kvs is not None:
            self.kvs.update(kvs)
        for rank in waiting:
            conn = self.bound.get(rank)
            if conn in self.conns:
                if kvs is None:
                    self.send(conn, line("barrier_out", rc=-1, msg="barrier-failed"))
                else:
                    self.send(conn, line("barrier_out", rc=0))


def _is_int(text: str) -> bool:
    return text.lstrip("-").isdigit() and len(text) < 12


def _int(a: Dict[str, str], key: str) -> int:
    if key not in a or not _is_int(a[key]):
        raise ProtocolError("expected-integer-" + key)
    return int(a[key])


def _word(a: Dict[str, str], key: str, limit: int) -> str:
    if key not in a:
        raise ProtocolError("expected-" + key)
    if len(a[key]) > limit:
        raise ProtocolError(key + "-too-long")
    return a[key]


def fnv1a(text: str) -> int:
    """32-bit FNV-1a, MPICH's ``HASH_FNV``."""
    h = 2166136261
    for b in text.encode():
        h = ((h ^ b) * 16777619) & 0xFFFFFFFF
    return h


def shm_leftovers(kvsname: str, node_id: int) -> List[str]:
    """The ``/dev/shm`` names MPICH's ranks on one node share, which a killed rank leaves behind.

    MPICH names them after a hash of the key-value space name (its world id)
    and the node id of ``PMI_process_mapping``; a later job with the same
    kvsname would attach to a stale segment of another size and fail in
    ``MPI_Init`` ("Out of memory"). So a kvsname must be unique per launch, and
    teardown removes these. The ``mpich`` wheel (5.0) hashes the kvsname alone;
    MPICH's main branch hashes ``kvsname-1`` (the init count): both are listed.
    """
    ids = (fnv1a(kvsname), fnv1a(kvsname + "-1"))
    return ["/dev/shm/mpich_%s_%x_%d" % (kind, i, node_id) for i in ids for kind in ("shm", "vci")]
