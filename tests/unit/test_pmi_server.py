"""The agent's PMI-1 server, line by line: recorded MPICH exchanges and malformed input.

The recorded lines are what the ``mpich`` wheel's libmpi (MPICH 5.0) sent to
this server during ``python -m mpi4py.bench ringtest`` on two fake nodes
(business-card values shortened).
"""

from __future__ import annotations

from collections.abc import Hashable

import pytest

from mnp.agent.pmi import NodeServer, shm_leftovers

MAPPING = "(vector,(0,2,2))"


class Node:
    """A NodeServer with its callbacks recorded."""

    def __init__(self, ranks: dict[int, int], size: int = 4) -> None:
        self.sent: list[tuple[Hashable, bytes]] = []
        self.barriers: list[tuple[int, dict[str, str]]] = []
        self.aborts: list[tuple[int, int, str]] = []
        self.lost: list[tuple[int, str]] = []
        self.s = NodeServer(
            "mnp-42",
            size,
            ranks,
            {"PMI_process_mapping": MAPPING},
            lambda conn, data: self.sent.append((conn, data)),
            lambda epoch, puts: self.barriers.append((epoch, puts)),
            lambda rank, code, msg: self.aborts.append((rank, code, msg)),
            lambda rank, phase: self.lost.append((rank, phase)),
        )

    def ask(self, conn: Hashable, text: str) -> list[str]:
        """Feed one or more lines; return what came back (to any connection)."""
        before = len(self.sent)
        self.s.feed(conn, text.encode())
        return [d.decode() for _, d in self.sent[before:]]

    def init(self, conn: Hashable) -> None:
        assert self.ask(conn, "cmd=init pmi_version=1 pmi_subversion=1\n") == [
            "cmd=response_to_init rc=0 pmi_version=1 pmi_subversion=1\n"
        ]


RECORDED_START = [
    (
        "cmd=init pmi_version=1 pmi_subversion=1",
        "cmd=response_to_init rc=0 pmi_version=1 pmi_subversion=1",
    ),
    ("cmd=get_maxes", "cmd=maxes rc=0 kvsname_max=256 keylen_max=64 vallen_max=1024"),
    ("cmd=get_appnum", "cmd=appnum rc=0 appnum=1"),
    ("cmd=get_my_kvsname", "cmd=my_kvsname rc=0 kvsname=mnp-42"),
    (
        "cmd=get kvsname=mnp-42 key=PMI_process_mapping",
        f"cmd=get_result rc=0 found=TRUE value={MAPPING}",
    ),
    (
        "cmd=get kvsname=mnp-42 key=PMI_hwloc_xmlfile",
        "cmd=get_result rc=-1 found=FALSE msg=key-not-found",
    ),
    ("cmd=put kvsname=mnp-42 key=-allgather-1-2 value=segments=9", "cmd=put_result rc=0"),
    (
        "cmd=put kvsname=mnp-42 key=-allgather-1-2-seg-1/9 value=204821575DCECC3866[2]6375",
        "cmd=put_result rc=0",
    ),
]


def test_recorded_mpich_start_put_barrier_get_finalize() -> None:
    node = Node({2: 1, 3: 1})
    node.s.attach("r2", 2)
    node.s.attach("r3", 3)
    for query, answer in RECORDED_START:
        assert node.ask("r2", query + "\n") == [answer + "\n"]
    assert node.ask("r2", "cmd=barrier_in\n") == []
    assert node.barriers == []  # rank 3 has not even initialized
    node.init("r3")
    assert node.ask("r3", "cmd=put kvsname=mnp-42 key=-allgather-1-3 value=segments=1\n") == [
        "cmd=put_result rc=0\n"
    ]
    assert node.ask("r3", "cmd=barrier_in\n") == []
    assert node.barriers == [
        (
            0,
            {
                "-allgather-1-2": "segments=9",
                "-allgather-1-2-seg-1/9": "204821575DCECC3866[2]6375",
                "-allgather-1-3": "segments=1",
            },
        )
    ]
    # the merged space of the whole job comes back; each local rank is released once
    node.s.release(0, {"-allgather-1-0": "segments=2", "-allgather-1-2": "segments=9"})
    assert sorted(node.sent[-2:]) == [
        ("r2", b"cmd=barrier_out rc=0\n"),
        ("r3", b"cmd=barrier_out rc=0\n"),
    ]
    assert node.ask("r3", "cmd=get kvsname=mnp-42 key=-allgather-1-0\n") == [
        "cmd=get_result rc=0 found=TRUE value=segments=2\n"
    ]
    # the second barrier carries only what was put since the first
    node.ask("r2", "cmd=barrier_in\n")
    node.ask("r3", "cmd=barrier_in\n")
    assert node.barriers[1] == (1, {})
    with pytest.raises(ValueError):
        node.s.release(0, {})
    node.s.release(1, {})
    assert node.ask("r2", "cmd=finalize\n") == ["cmd=finalize_ack rc=0\n"]
    node.s.closed("r2")
    assert node.lost == []


def test_a_finalized_rank_does_not_hold_up_the_barrier_of_the_others() -> None:
    node = Node({0: 0, 1: 0}, size=2)
    node.s.attach("a", 0)
    node.s.attach("b", 1)
    node.init("a")
    node.init("b")
    node.ask("a", "cmd=finalize\n")
    node.ask("b", "cmd=barrier_in\n")
    assert node.barriers == [(0, {})]


def test_ranks_not_yet_initialized_are_known() -> None:
    node = Node({4: 0, 5: 0, 6: 0}, size=7)
    node.s.attach("a", 4)
    node.s.attach("b", 5)
    assert node.s.not_initialized() == [4, 5, 6]
    node.init("b")
    assert node.s.not_initialized() == [4, 6]


def test_a_failed_barrier_answers_an_error() -> None:
    node = Node({0: 0}, size=1)
    node.s.attach("a", 0)
    node.init("a")
    node.ask("a", "cmd=barrier_in\n")
    node.s.release(0, None)
    assert node.sent[-1] == ("a", b"cmd=barrier_out rc=-1 msg=barrier-failed\n")


def test_lines_may_arrive_split_and_batched() -> None:
    node = Node({0: 0}, size=1)
    node.s.attach("a", 0)
    assert node.ask("a", "cmd=in") == []
    assert node.ask("a", "it pmi_version=1 pmi_subversion=1\ncmd=get_ap") == [
        "cmd=response_to_init rc=0 pmi_version=1 pmi_subversion=1\n"
    ]
    assert node.ask("a", "pnum\ncmd=get_universe_size\n") == [
        "cmd=appnum rc=0 appnum=0\n",
        "cmd=universe_size rc=0 size=1\n",
    ]


def test_attaching_a_rank_of_another_node_is_a_bug_of_the_caller() -> None:
    node = Node({0: 0}, size=2)
    with pytest.raises(ValueError, match="rank-1-is-not-on-this-node"):
        node.s.attach("a", 1)


def test_pmi_port_identifies_the_rank_by_initack() -> None:
    node = Node({1: 0}, size=2)
    node.s.attach("c")
    assert node.ask("c", "cmd=get_maxes\n") == ["cmd=maxes rc=-1 msg=send-initack-pmiid-first\n"]
    assert node.ask("c", "cmd=initack pmiid=0\n") == [
        "cmd=initack rc=-1 msg=rank-0-is-not-on-this-node\n"
    ]
    assert node.ask("c", "cmd=initack pmiid=1\n") == [
        "cmd=initack\ncmd=set size=2\ncmd=set rank=1\ncmd=set debug=0\n"
    ]
    node.init("c")
    node.s.attach("d")
    assert node.ask("d", "cmd=initack pmiid=1\n") == [
        "cmd=initack rc=-1 msg=rank-1-already-connected\n"
    ]


@pytest.mark.parametrize(
    ("query", "answer"),
    [
        ("hello", "cmd=error rc=-1 msg=expected-key=value-words"),
        ("=x", "cmd=error rc=-1 msg=expected-key=value-words"),
        ("key=x", "cmd=error rc=-1 msg=expected-cmd="),
        ("cmd=get cmd=put", "cmd=error rc=-1 msg=repeated-cmd"),
        ("cmd=frobnicate", "cmd=error rc=-1 msg=unknown-command-frobnicate"),
        ("cmd=fro\x01b", "cmd=error rc=-1 msg=unknown-command-fro?b"),
        ("cmd=\xff", "cmd=error rc=-1 msg=not-ascii"),
        (
            "cmd=init pmi_version=2 pmi_subversion=0",
            "cmd=response_to_init rc=-1 msg=only-PMI-1-is-served",
        ),
        (
            "cmd=init pmi_version=x pmi_subversion=1",
            "cmd=response_to_init rc=-1 msg=expected-integer-pmi_version",
        ),
        ("cmd=put kvsname=mnp-42 key=k", "cmd=put_result rc=-1 msg=expected-value"),
        (
            "cmd=put kvsname=mnp-42 key=" + "k" * 65 + " value=v",
            "cmd=put_result rc=-1 msg=key-too-long",
        ),
        (
            "cmd=put kvsname=mnp-42 key=k value=" + "v" * 1025,
            "cmd=put_result rc=-1 msg=value-too-long",
        ),
        ("cmd=get kvsname=mnp-42", "cmd=get_result rc=-1 msg=expected-key"),
        # another job's key-value space is never read or written
        (
            "cmd=get kvsname=mnp-41 key=PMI_process_mapping",
            "cmd=get_result rc=-1 msg=unknown-kvsname",
        ),
        ("cmd=put kvsname=mnp-41 key=k value=v", "cmd=put_result rc=-1 msg=unknown-kvsname"),
        (
            "cmd=publish_name service=s port=p",
            "cmd=publish_result rc=-1 msg=name-service-not-supported",
        ),
        ("cmd=lookup_name service=s", "cmd=lookup_result rc=-1 msg=name-service-not-supported"),
        (
            "cmd=unpublish_name service=s",
            "cmd=unpublish_result rc=-1 msg=name-service-not-supported",
        ),
        ("cmd=initack pmiid=0", "cmd=initack rc=-1 msg=already-identified"),
        ("x" * 5000, "cmd=error rc=-1 msg=line-too-long"),
    ],
)
def test_malformed_lines_are_answered_with_an_error_and_the_server_goes_on(
    query: str, answer: str
) -> None:
    node = Node({0: 0}, size=1)
    node.s.attach("a", 0)
    node.init("a")
    node.s.feed("a", query.encode("latin-1") + b"\n")
    assert node.sent[-1] == ("a", (answer + "\n").encode())
    assert node.ask("a", "cmd=get_appnum\n") == ["cmd=appnum rc=0 appnum=0\n"]
    assert node.aborts == node.lost == []


def test_a_line_without_its_newline_cannot_grow_without_bound() -> None:
    node = Node({0: 0}, size=1)
    node.s.attach("a", 0)
    assert node.ask("a", "x" * 5000) == ["cmd=error rc=-1 msg=line-too-long\n"]
    node.init("a")


def test_queries_before_init_and_after_finalize_are_errors() -> None:
    node = Node({0: 0}, size=1)
    node.s.attach("a", 0)
    assert node.ask("a", "cmd=get_maxes\n") == ["cmd=maxes rc=-1 msg=send-init-first\n"]
    assert node.ask("a", "cmd=barrier_in\n") == ["cmd=barrier_out rc=-1 msg=send-init-first\n"]
    node.init("a")
    node.ask("a", "cmd=finalize\n")
    assert node.ask("a", "cmd=get_appnum\n") == ["cmd=appnum rc=-1 msg=finalized\n"]


def test_barrier_in_twice_is_an_error() -> None:
    node = Node({0: 0, 1: 0}, size=2)
    node.s.attach("a", 0)
    node.s.attach("b", 1)
    node.init("a")
    node.ask("a", "cmd=barrier_in\n")
    assert node.ask("a", "cmd=barrier_in\n") == ["cmd=barrier_out rc=-1 msg=already-in-barrier\n"]


def test_spawn_is_refused_after_its_endcmd() -> None:
    node = Node({0: 0}, size=1)
    node.s.attach("a", 0)
    node.init("a")
    assert node.ask("a", "mcmd=spawn\nnprocs=2\nexecname=a.out\n") == []
    assert node.ask("a", "endcmd\n") == ["cmd=spawn_result rc=-1 msg=spawn-not-supported\n"]
    assert node.ask("a", "cmd=get_appnum\n") == ["cmd=appnum rc=0 appnum=0\n"]


@pytest.mark.parametrize(
    ("query", "code", "message"),
    [
        ("cmd=abort exitcode=7", 7, ""),
        ("cmd=abort exitcode=7 message=oops", 7, "oops"),
        # recorded: what mpi4py's MPI.COMM_WORLD.Abort(7) sends
        ("cmd=abort exitcode=7 message=abort", 7, "abort"),
        # MPICH does not escape the message of PMI_Abort
        (
            "cmd=abort exitcode=15 message=Fatal error in internal_Init_thread: x=1",
            15,
            "Fatal error in internal_Init_thread: x=1",
        ),
        ("cmd=abort exit_code=3", 3, ""),
        ("cmd=abort", 1, ""),
        ("cmd=abort exitcode=nan", 1, ""),
    ],
)
def test_abort_is_reported_with_rank_and_code(query: str, code: int, message: str) -> None:
    node = Node({5: 0}, size=6)
    node.s.attach("a", 5)
    node.init("a")
    assert node.ask("a", query + "\n") == []
    assert node.aborts == [(5, code, message)]
    node.s.closed("a")
    assert node.lost == []  # the abort said it all


@pytest.mark.parametrize(
    ("lines", "phase"),
    [
        ("", "before init"),
        ("cmd=init pmi_version=1 pmi_subversion=1\n", "after init, before finalize"),
        ("cmd=init pmi_version=1 pmi_subversion=1\ncmd=finalize\n", None),
    ],
)
def test_a_rank_closing_before_finalize_is_reported(lines: str, phase: str | None) -> None:
    node = Node({0: 0}, size=1)
    node.s.attach("a", 0)
    node.ask("a", lines)
    node.s.closed("a")
    assert node.lost == ([] if phase is None else [(0, phase)])


def test_shm_leftovers_are_named_as_mpich_names_them() -> None:
    # observed: ranks of kvsname mnp-68923164 killed on node id 1 left mpich_shm_4c071192_1
    assert shm_leftovers("mnp-68923164", 1) == [
        "/dev/shm/mpich_shm_4c071192_1",
        "/dev/shm/mpich_vci_4c071192_1",
        "/dev/shm/mpich_shm_f9d93294_1",
        "/dev/shm/mpich_vci_f9d93294_1",
    ]
