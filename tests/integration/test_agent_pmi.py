"""The agent's side of a direct MPI launch (mnp/agent/ranks.py), driven over its stdio
with ranks that speak the PMI-1 wire protocol themselves (no MPI library): a `spawn`
with `pmi`, `pmi_barrier`, `pmi_release`, `pmi_fail`, and bad `pmi` parts refused."""

from __future__ import annotations

import sys
from typing import Any

from tests.integration.test_agent_driver import Agent

# a rank: init, put its key, barrier, get the other rank's key, finalize (or abort)
RANK = r"""
import os, sys
fd = int(os.environ["PMI_FD"])
f = os.fdopen(fd, "r+b", buffering=0)
rank = int(os.environ["PMI_RANK"])
def ask(line):
    f.write((line + "\n").encode())
    return f.readline().decode().split()
print("init", ask("cmd=init pmi_version=1 pmi_subversion=1"), flush=True)
kvs = ask("cmd=get_my_kvsname")[-1].split("=")[1]
ask("cmd=put kvsname=%s key=k%d value=v%d" % (kvs, rank, rank))
if sys.argv[1] == "abort" and rank == 1:
    f.write(b"cmd=abort exitcode=7 message=rank one gives up\n")
    sys.exit(7)
print("barrier", ask("cmd=barrier_in"), flush=True)
print("got", ask("cmd=get kvsname=%s key=k%d" % (kvs, 1 - rank)), flush=True)
print("map", ask("cmd=get kvsname=%s key=PMI_process_mapping" % kvs), flush=True)
print("fin", ask("cmd=finalize"), flush=True)
"""


def pmi(rank: int, **extra: Any) -> dict[str, Any]:
    part = {
        "kvsname": "kvs-test",
        "node": 0,
        "node_id": 0,
        "rank": rank,
        "size": 2,
        "appnums": {"0": 0, "1": 0},
        "attrs": {"PMI_process_mapping": "(vector,(0,1,2))"},
        "init_within": 30,
    }
    part.update(extra)
    return part


def start_ranks(agent: Agent, how: str) -> None:
    for rank in (0, 1):
        agent.send(
            op="spawn",
            tid=f"9#0.{rank}",
            argv=[sys.executable, "-c", RANK, how],
            env={"PMI_RANK": str(rank), "PMI_SIZE": "2"},
            pmi=pmi(rank),
        )


def test_barrier_goes_to_the_controller_and_back(agent: Agent) -> None:
    start_ranks(agent, "ok")
    barrier = agent.expect("pmi_barrier")
    assert (barrier["kvsname"], barrier["node"], barrier["epoch"]) == ("kvs-test", 0, 0)
    assert barrier["puts"] == {"k0": "v0", "k1": "v1"}  # the node's puts, merged
    assert barrier["tid"] in ("9#0.0", "9#0.1")
    agent.send(op="pmi_release", kvsname="kvs-test", nodes=[0], epoch=0, kvs=barrier["puts"])
    for rank in (0, 1):
        exited = agent.expect("exited", f"9#0.{rank}")
        assert exited["code"] == 0
        out = agent.output(f"9#0.{rank}")
        assert "init ['cmd=response_to_init', 'rc=0', 'pmi_version=1', 'pmi_subversion=1']" in out
        assert "barrier ['cmd=barrier_out', 'rc=0']" in out
        assert f"'value=v{1 - rank}'" in out
        assert "'value=(vector,(0,1,2))'" in out
        assert "fin ['cmd=finalize_ack', 'rc=0']" in out
    assert not any(e["ev"] == "pmi_fail" for e in agent.history)


def test_abort_is_reported_before_the_ranks_exit(agent: Agent) -> None:
    start_ranks(agent, "abort")
    fail = agent.expect("pmi_fail")
    assert (fail["tid"], fail["rank"], fail["code"], fail["node"]) == ("9#0.1", 1, 7, 0)
    assert fail["reason"] == (
        "MPI rank 1 (task 9#0.1, node 0) called MPI_Abort with code 7: rank one gives up"
    )
    assert agent.expect("exited", "9#0.1")["code"] == 7
    order = [e["ev"] for e in agent.history if e.get("tid") == "9#0.1"]
    assert order.index("pmi_fail") < order.index("exited"), order
    agent.send(op="kill", tid="9#0.0", grace=0.5)  # the controller's teardown
    agent.expect("gone", "9#0.0")
    agent.expect("gone", "9#0.1")


def test_bad_pmi_parts_are_refused(agent: Agent) -> None:
    bad = [
        ("x", "pmi must be an object"),
        (pmi(0, kvsname="a b"), "pmi.kvsname must be a word"),
        (pmi(5), "pmi.rank 5 is not one of this node's ranks"),
        (pmi(0, appnums=[0]), "pmi.appnums must map"),
        (pmi(0, init_within=0), "pmi.init_within must be a positive number"),
        (pmi(0, size="2"), "size must be an integer"),
    ]
    for i, (part, says) in enumerate(bad):
        agent.send(op="spawn", tid=f"b{i}", argv=["true"], pmi=part)
        err = agent.expect("error", f"b{i}")
        assert says in err["msg"], err
    agent.send(op="pmi_release", kvsname="nope", nodes="0", epoch=0, kvs={})
    assert "nodes must be a list" in agent.expect("error")["msg"]
    assert not any(e["ev"] == "started" for e in agent.history)
