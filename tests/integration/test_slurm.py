"""mnp inside a real Slurm allocation (the 4-node cluster of slurm.py): ``--inventory
slurm`` starts its agents as job steps with ``srun``, no SSH involved.

Every job here is an ``sbatch`` script that runs ``python -m mnp`` (this test's
interpreter, as a submission script activating its venv would) and prints what came
back; the test reads the script's output file. Proof that srun carried an agent:
its tasks see ``SLURM_STEP_ID`` (only a job step has one) and ``SLURMD_NODENAME`` of
the node the step runs on, while the batch script itself runs on the first node only.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path

import pytest

from tests.integration.slurm import SlurmCluster

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(300)]


def _batch(cluster: SlurmCluster, tmp_path: Path, body: str, nodes: int = 2) -> str:
    """Run ``body`` (bash, ``$MNP`` = this interpreter's mnp) as ``sbatch -N nodes``;
    its output once the job has left the queue."""
    return _finish(cluster, tmp_path, _submit(cluster, tmp_path, body, nodes))


def _submit(cluster: SlurmCluster, tmp_path: Path, body: str, nodes: int) -> str:
    cluster.wait_idle()  # so that the job gets n1, n2, ... whatever ran before
    script = tmp_path / "job.sh"
    out = tmp_path / "job.out"
    mnp = f"{shlex.quote(sys.executable)} -m mnp"
    script.write_text(
        "#!/bin/bash\n"
        f"export MNP_HOME={shlex.quote(str(tmp_path / 'home'))}\n"
        f"MNP={shlex.quote(mnp)}\n"
        f"{body}\n"
    )
    return cluster.sbatch(
        f"-N{nodes}", "--exclusive", f"--output={out}", f"--chdir={tmp_path}", str(script)
    )


def _finish(cluster: SlurmCluster, tmp_path: Path, job: str) -> str:
    out = tmp_path / "job.out"
    state = cluster.wait_job(job, timeout=240)
    text = out.read_text() if out.exists() else ""
    assert state == "COMPLETED", f"slurm job {job}: {state}\n{text}\n{cluster.logs()}"
    return text


def test_cluster_runs_steps_on_four_nodes(slurm_cluster: SlurmCluster) -> None:
    r = slurm_cluster.run("srun", "-N4", "-l", "sh", "-c", "echo $SLURMD_NODENAME")
    assert sorted(r.stdout.split()[1::2]) == ["n1", "n2", "n3", "n4"], r.stdout + r.stderr


def test_inventory_inside_allocation_is_srun(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    out = _batch(
        slurm_cluster,
        tmp_path,
        "$MNP hosts --inventory slurm --json > hosts.json\n"
        "$MNP hosts --inventory slurm --check --json > check.json\n"
        "MNP_SLURM_TRANSPORT=ssh $MNP hosts --inventory slurm --json > hosts-ssh.json",
    )
    hosts = json.loads((tmp_path / "hosts.json").read_text())
    assert [(h["name"], h["vcpus"], h["transport"]) for h in hosts] == [
        ("n1", 2, "srun"),
        ("n2", 2, "srun"),
    ], out
    checked = json.loads((tmp_path / "check.json").read_text())
    assert [(r["name"], r["ok"]) for r in checked] == [("n1", True), ("n2", True)], out
    kept = json.loads((tmp_path / "hosts-ssh.json").read_text())
    assert [h["transport"] for h in kept] == ["ssh", "ssh"], out


def test_multinode_job_over_srun(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    """A 2-node job: each node's task runs under its own slurmd as a step, output and
    exit codes come back; a failing main node's exit code is mnp run's."""
    out = _batch(
        slurm_cluster,
        tmp_path,
        "$MNP run --inventory slurm --nodes 2 -- sh -c "
        "'echo \"node=$MNP_NODE_INDEX of $MNP_NUM_NODES on=$SLURMD_NODENAME "
        "step=${SLURM_STEP_ID:-none} py=$(command -v python3)\"'\n"
        'echo "ok-rc=$?"\n'
        "$MNP run --inventory slurm --nodes 2 -- sh -c 'exit $((3 + MNP_NODE_INDEX))'\n"
        'echo "fail-rc=$?"\n'
        "$MNP run --inventory slurm -- sh -c 'echo single on $SLURMD_NODENAME; exit 9'\n"
        'echo "single-rc=$?"\n',
    )
    lines = out.splitlines()
    venv_bin = str(Path(sys.executable).parent)
    for index, node in ((0, "n1"), (1, "n2")):
        mine = [ln for ln in lines if f"node={index} of 2 on={node} step=" in ln]
        assert len(mine) == 1, out
        assert "step=none" not in mine[0], out  # the agent ran as a Slurm job step
        assert f"py={venv_bin}/python3" in mine[0], out  # the submitter's environment
    assert "ok-rc=0" in lines, out
    assert "fail-rc=3" in lines, out
    assert "single-rc=9" in lines and any("single on n" in ln for ln in lines), out


def test_mpi_hello_over_srun(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    """nodegroups/mpi-hello.toml on 2 nodes of the allocation: mpiexec (MPICH's hydra) sees
    the Slurm job in its environment and starts its ranks with srun too; no SSH anywhere."""
    root = shlex.quote(str(Path(__file__).resolve().parents[2]))
    out = _batch(
        slurm_cluster,
        tmp_path,
        f'cd {root}\n$MNP run --inventory slurm --nodes 2 nodegroups/mpi-hello.toml\necho "rc=$?"',
    )
    assert "rc=0" in out.splitlines(), out
    assert "hello from rank 0 of 2 on node 0 (n1)" in out, out
    assert "hello from rank 1 of 2 on node 1 (n2)" in out, out
    assert "allreduce ok: sum of ranks = 1; 2 distinct nodes" in out, out


def test_direct_mpi_launch_over_srun(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    """nodegroups/pmi-hello.toml on 2 nodes x 2 ranks: the agents (srun steps) start the
    ranks and serve them PMI; no mpiexec, no SSH."""
    root = shlex.quote(str(Path(__file__).resolve().parents[2]))
    out = _batch(
        slurm_cluster,
        tmp_path,
        f'cd {root}\n$MNP run --inventory slurm --nodes 2 nodegroups/pmi-hello.toml\necho "rc=$?"',
    )
    assert "rc=0" in out.splitlines(), out
    for rank in range(4):
        node = rank // 2
        assert f"hello from rank {rank} of 4 on node {node} (n{node + 1})" in out, out
    assert "allreduce ok: sum of ranks = 6; 2 distinct nodes" in out, out


def test_cancelled_agent_step_is_host_lost(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    """``scancel`` of the step that carries node 1's agent: ``Host lost: NODE``, and the
    job's second attempt runs on the allocation's spare node."""
    job = _submit(
        slurm_cluster,
        tmp_path,
        "$MNP run -v --inventory slurm --nodes 2 --attempts 2 -- sh -c "
        "'echo $SLURMD_NODENAME > started-$MNP_NODE_INDEX-$MNP_JOB_ATTEMPT; sleep 6; "
        'echo "done $MNP_NODE_INDEX on $SLURMD_NODENAME"\'\n'
        'echo "rc=$?"',
        nodes=3,
    )
    marker = tmp_path / "started-1-1"
    deadline = time.monotonic() + 120
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert marker.exists(), _finish(slurm_cluster, tmp_path, job)
    victim = marker.read_text().strip()
    steps = slurm_cluster.run("squeue", "-s", "-h", "-j", job, "-o", "%i %j %N").stdout.split("\n")
    step = [ln.split()[0] for ln in steps if ln.split()[1:] == ["mnp-agent", victim]]
    assert len(step) == 1, steps
    slurm_cluster.run("scancel", step[0])
    out = _finish(slurm_cluster, tmp_path, job)
    assert f"Host lost: {victim}" in out, out
    assert "rc=0" in out.splitlines(), out
    retried = {(tmp_path / f"started-{i}-2").read_text().strip() for i in (0, 1)}
    assert victim not in retried and len(retried) == 2, (retried, out)


def test_killed_mnp_leaves_no_step_or_task(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    """SIGKILL of ``mnp run``: srun's stdin closes, each agent kills its tasks and exits,
    and the steps end; nothing of the job is left on any node."""
    job = _submit(
        slurm_cluster,
        tmp_path,
        "$MNP run --inventory slurm --nodes 2 -- sh -c "
        "'echo $$ > task-$MNP_NODE_INDEX.pid; exec sleep 300' &\n"
        "echo $! > mnp.pid\n"
        "while [ ! -s task-0.pid ] || [ ! -s task-1.pid ]; do sleep 0.2; done\n"
        "sleep 0.5\n"
        "kill -9 $(cat mnp.pid)\n"
        "for i in $(seq 100); do\n"
        "  squeue -s -h -j $SLURM_JOB_ID -o %j | grep -q mnp-agent || break; sleep 0.2\n"
        "done\n"
        "squeue -s -h -j $SLURM_JOB_ID -o 'left %j %N'\n"
        "for f in task-*.pid; do kill -0 $(cat $f) 2>/dev/null && echo alive $f; done\n"
        "echo finished",
        nodes=2,
    )
    out = _finish(slurm_cluster, tmp_path, job)
    assert "finished" in out, out
    assert "left mnp-agent" not in out and "alive" not in out, out


def test_agent_shipped_to_python_without_mnp(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    """A node Python that cannot import mnp (``MNP_SRUN_PYTHON``) gets the agent's source
    over srun's stdin, as over SSH."""
    bare = "/usr/bin/python3"
    assert Path(bare).exists()
    out = _batch(
        slurm_cluster,
        tmp_path,
        f"export MNP_SRUN_PYTHON={bare}\n"
        f"{bare} -c 'import mnp' 2>/dev/null && echo 'bare python imports mnp'\n"
        "$MNP run --inventory slurm --nodes 2 --python-env none -- "
        "sh -c 'echo shipped-$MNP_NODE_INDEX-$SLURMD_NODENAME'\n"
        'echo "rc=$?"',
    )
    assert "bare python imports mnp" not in out
    assert "shipped-0-n1" in out and "shipped-1-n2" in out and "rc=0" in out, out


def test_srun_outside_allocation_is_refused(tmp_path: Path) -> None:
    """``MNP_SLURM_TRANSPORT=srun`` without an allocation: one line, exit 2."""
    from tests.helpers import mnp

    env = {"SLURM_JOB_NODELIST": "n[1-2]", "MNP_SLURM_TRANSPORT": "srun", "SLURM_JOB_ID": ""}
    r = mnp("hosts", "--inventory", "slurm", "--json", env=env, timeout=30)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().count("\n") == 0
    assert r.stderr.startswith("mnp: slurm:MNP_SLURM_TRANSPORT: srun needs"), r.stderr


def test_missing_python_on_the_nodes_says_so(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    out = _batch(
        slurm_cluster,
        tmp_path,
        "MNP_SRUN_PYTHON=/nonexistent/python3 $MNP run --inventory slurm --nodes 2 -- true\n"
        'echo "rc=$?"',
    )
    assert "rc=3" in out.splitlines(), out
    assert "mnp: no host reachable: " in out, out
    for node in ("n1", "n2"):  # in either order; each with the reason, not srun's exit code
        assert (
            f"{node}: agent exited before it was ready (slurmstepd-{node}: error: execve(): "
            "/nonexistent/python3: No such file or directory)"
        ) in out, out
