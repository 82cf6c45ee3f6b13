"""Containers (issue 14): the definition fields, and the runtime command lines the agent
builds (golden files for podman, docker and apptainer)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mnp.agent import containers as containers_mod
from mnp.agent.container import (
    ContainerError,
    Spec,
    container_name,
    find_runtime,
    forwarded,
    wrap,
)
from mnp.agent.containers import Containers, oom_usage_in
from mnp.agent.proc import agent_identity, read_stat
from mnp.agent.sweep import StaleRule
from mnp.errors import SpecError
from mnp.model import Container, Mount
from mnp.spec import (
    apply_overrides,
    definition_from_command,
    definition_to_dict,
    parse_definition,
)
from tests.unit.test_wiring import check_golden

SECRET = "s3cr3t-value-never-in-argv"
CHANGES = {
    "MNP_NODE_INDEX": "1",
    "MNP_HOSTFILE": "/tmp/mnp-0/tok/42.1/hostfile",
    "CUDA_VISIBLE_DEVICES": "2,3",
    "API_TOKEN": SECRET,
    "UNSET_ME": None,
}
HOST_ENV = {"PATH": "/usr/bin:/bin", "HOME": "/root", "CONTAINERS_CONF": "/etc/c.conf"}
TAGS = {"MNP_JOB_ID": "42#1", "MNP_CONTROLLER_ID": "tok", "MNP_AGENT_ID": "b.n:7:9"}
ENV = {**HOST_ENV, **{k: v for k, v in CHANGES.items() if v is not None}, **TAGS}
SPEC = Spec(
    image="localhost/train:v1",
    runtime="auto",
    mounts=["/tmp/mnp-0/tok/42.1:/tmp/mnp-0/tok/42.1:ro", "/data:/data"],
    options=["--shm-size", "1g"],
    gpus=[2, 3],
)
LABELS = {"mnp.job": "42", "mnp.task": "42#1", "mnp.ctl": "tok", "mnp.agent": "b.n:7:9"}


def _built(kind: str, spec: Spec = SPEC) -> dict[str, object]:
    names = forwarded(CHANGES)
    argv, env = wrap(
        kind,
        f"/usr/bin/{kind}",
        spec,
        ["python3", "train.py", "--epochs", "3"],
        ENV,
        names,
        "/work/proj",
        container_name("tok", "42#1"),
        LABELS,
    )
    assert SECRET not in " ".join(argv)  # values travel in the environment only
    changed = {k: v for k, v in env.items() if ENV.get(k) != v}
    return {"argv": argv, "env_changed": changed}


@pytest.mark.parametrize("kind", ["podman", "docker", "apptainer"])
def test_runtime_argv_golden(kind: str) -> None:
    check_golden(f"container_{kind}.json", _built(kind))


def test_no_gpus_no_device_flags() -> None:
    bare = Spec(image="img")
    for kind in ("podman", "docker"):
        argv = _built(kind, bare)["argv"]
        assert isinstance(argv, list)
        assert "--device" not in argv and "--gpus" not in argv
        assert argv[-5:] == ["img", "python3", "train.py", "--epochs", "3"]
    assert "--nv" not in _built("apptainer", bare)["argv"]  # type: ignore[operator]


def test_docker_single_gpu_is_unquoted() -> None:
    argv = _built("docker", Spec(image="img", gpus=[5]))["argv"]
    assert isinstance(argv, list)
    i = argv.index("--gpus")
    assert argv[i + 1] == "device=5"


def test_podman_and_docker_enforce_the_memory_limit_and_cpus() -> None:
    """The container's processes are the runtime's, outside the agent's cgroup and the
    client's affinity: podman and docker get the limits; apptainer's inherit them."""
    env = {**ENV, "MNP_MEMORY_LIMIT": str(32 << 20), "MNP_CPUS": "0,3"}
    for kind in ("podman", "docker"):
        argv, _ = wrap(kind, kind, Spec(image="img"), ["true"], env, [], None, "n", {})
        assert argv[argv.index("--memory") + 1] == str(32 << 20)
        assert argv[argv.index("--memory-swap") + 1] == str(32 << 20)
        assert argv[argv.index("--cpuset-cpus") + 1] == "0,3"
        assert argv.index("--cpuset-cpus") < argv.index("img")
        bare, _ = wrap(kind, kind, Spec(image="img"), ["true"], ENV, [], None, "n", {})
        assert "--memory" not in bare and "--cpuset-cpus" not in bare
    argv, _ = wrap("apptainer", "apptainer", Spec(image="img"), ["true"], env, [], None, "n", {})
    assert "--memory" not in argv and "--cpuset-cpus" not in argv


def test_the_agent_does_not_hold_a_runtime_client_to_the_memory_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bindir, _ = _fake_runtime(tmp_path, monkeypatch)
    c = Containers("tok", agent_identity())
    c.rundir = str(tmp_path / "run")
    changes = {"MNP_MEMORY_LIMIT": str(32 << 20), "MNP_CPUS": "1"}
    assert c.limited("7", changes) == changes  # not (yet) in a container: the agent's
    env = {"PATH": str(bindir), "MNP_JOB_ID": "7", **changes}
    c.wrap_spawn(Spec(image="img", runtime="podman"), "7", ["true"], env, changes, None, False)
    assert c.limited("7", changes) == {"MNP_CPUS": "1"}  # podman's --memory holds it
    c.task_gone("7", abnormal=False)


def test_forwarded_names() -> None:
    assert forwarded(CHANGES) == sorted(
        ["MNP_NODE_INDEX", "MNP_HOSTFILE", "CUDA_VISIBLE_DEVICES", "API_TOKEN", *TAGS]
    )


def test_container_name_is_valid_and_distinct() -> None:
    names = {container_name("tok", t) for t in ("42", "42:7", "42#7", "42#3.1", "4/2 x")}
    assert len(names) == 5
    for n in names:
        assert n.startswith("mnp-tok-")
        assert all(c.isalnum() or c in "_.-" for c in n), n


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        ("img", "must be an object"),
        ({}, "image"),
        ({"image": "-x"}, "image"),
        ({"image": "i", "runtime": "lxc"}, "runtime"),
        ({"image": "i", "mounts": ["rel:/x"]}, "HOST:CONTAINER"),
        ({"image": "i", "mounts": "/a:/b"}, "mounts"),
        ({"image": "i", "gpus": [-1]}, "gpus"),
        ({"image": "i", "options": [1]}, "options"),
    ],
)
def test_malformed_container_message(value: object, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        Spec.from_message(value)


def test_find_runtime(tmp_path: Path) -> None:
    for name in ("docker", "apptainer"):
        exe = tmp_path / name
        exe.write_text("#!/bin/sh\n")
        exe.chmod(0o755)
    (tmp_path / "podman").write_text("not executable")
    path = f"/nonexistent{os.pathsep}{tmp_path}"
    assert find_runtime("auto", path) == ("docker", str(tmp_path / "docker"))
    assert find_runtime("apptainer", path) == ("apptainer", str(tmp_path / "apptainer"))
    with pytest.raises(ContainerError, match="podman: container runtime not found") as e:
        find_runtime("podman", path)
    assert e.value.code == 127
    with pytest.raises(ContainerError, match="no container runtime"):
        find_runtime("auto", "/nonexistent")


# --- definition fields ------------------------------------------------------------

DEF = {
    "name": "c",
    "type": "multinode",
    "command": ["hostname"],
    "container": {"image": "localhost/a:1", "mounts": ["/data:/data:ro"], "runtime": "podman"},
    "multinode": {
        "num_nodes": 3,
        "groups": [
            {"target_nodes": "0"},
            {
                "target_nodes": "1:",
                "container": {"image": "localhost/b:2", "options": ["--ipc=host"]},
            },
        ],
    },
}


def test_group_container_wins_and_round_trips() -> None:
    d = parse_definition(DEF, "c.toml")
    assert d.container == Container(
        image="localhost/a:1",
        runtime="podman",
        mounts=(Mount("/data", "/data", read_only=True),),
    )
    assert d.container_for(0) == d.container
    b = Container(image="localhost/b:2", options=("--ipc=host",))
    assert d.container_for(1) == d.container_for(2) == b
    assert parse_definition(definition_to_dict(d), "c.toml") == d  # what the store keeps


def test_image_and_mount_options() -> None:
    d = definition_from_command(["true"], image="localhost/x:1", mounts=("/a:/b", "/c:/d:ro"))
    assert d.container == Container(
        image="localhost/x:1", mounts=(Mount("/a", "/b"), Mount("/c", "/d", read_only=True))
    )
    # --image/--mount change the job's image and every group's own
    g = apply_overrides(parse_definition(DEF, "c.toml"), image="localhost/y:3", mounts=["/e:/f"])
    for i in range(3):
        c = g.container_for(i)
        assert c is not None and c.image == "localhost/y:3"
        assert c.mounts[-1] == Mount("/e", "/f")


def test_mount_without_container_is_refused() -> None:
    with pytest.raises(SpecError, match=r"^<command line>:--mount: needs a container"):
        definition_from_command(["true"], mounts=("/a:/b",))
    with pytest.raises(SpecError, match=r"^<command line>:--mount: .*not absolute"):
        definition_from_command(["true"], image="x", mounts=("a:/b",))


# --- the agent's bookkeeping: markers, `rm -f` after an abnormal end, the stale sweep ---


def _fake_runtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """A `podman` that only records its `rm` arguments (one line a call), and whose
    `inspect` finds nothing (the containers are gone); one `rm -f` is then enough."""
    monkeypatch.setattr(containers_mod, "RM_AT_LEAST", 1)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "calls"
    exe = bindir / "podman"
    exe.write_text(f'#!/bin/sh\n[ "$1" = inspect ] && exit 1\necho "$@" >> {log}\n')
    exe.chmod(0o755)
    return bindir, log


def _wait_helpers(c: Containers) -> None:
    for pid in list(c.helpers):
        os.waitpid(pid, 0)
        assert c.reaped(pid)


def test_container_removed_after_an_abnormal_end_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bindir, log = _fake_runtime(tmp_path, monkeypatch)
    me = agent_identity()
    c = Containers("tok", me)
    c.rundir = str(tmp_path / "run")
    env = {"PATH": str(bindir), "MNP_JOB_ID": "7"}
    spec = Spec(image="img", runtime="podman")
    argv, _ = c.wrap_spawn(spec, "7", ["true"], env, {}, None, False)
    assert argv[:2] == [str(bindir / "podman"), "run"]
    markers = tmp_path / "run" / "containers"
    assert [p.name for p in markers.iterdir()] == ["mnp-tok-7"]
    c.task_gone("7", abnormal=False)  # ended by itself: --rm did it
    assert not list(markers.iterdir()) and not c.helpers and not log.exists()
    c.wrap_spawn(spec, "7", ["true"], env, {}, None, False)
    c.task_gone("7", abnormal=True)  # killed: its record may be left
    _wait_helpers(c)
    assert log.read_text() == "rm -f --time 0 mnp-tok-7\n"
    assert not list(markers.iterdir())


def test_stale_removes_containers_of_dead_agents_and_finished_jobs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bindir, log = _fake_runtime(tmp_path, monkeypatch)
    me = agent_identity()
    here = me.split(":", 1)[0]
    dead = f"{here}:999999999:1"  # no such process
    env = {"PATH": str(bindir)}
    spec = Spec(image="img", runtime="podman")
    rundir = str(tmp_path / "run")
    for agent, tids in ((dead, ["3"]), (me, ["4"])):
        other = Containers("tok", agent)
        other.rundir = rundir
        for tid in tids:
            other.wrap_spawn(spec, tid, ["true"], {**env, "MNP_JOB_ID": tid}, {}, None, False)
    live = Containers("tok", f"{here}:{os.getppid()}:{_start_of_parent()}")  # a live agent
    live.rundir = rundir
    live.wrap_spawn(spec, "5", ["true"], env, {}, None, False)  # job 5 still runs
    live.wrap_spawn(spec, "2", ["true"], env, {}, None, False)  # job 2 is over
    sweeper = Containers("tok", me)
    sweeper.rundir = rundir
    rule = StaleRule({"5"}, 10, here, me)
    # its own (4) stays; 3's agent is dead; 2's job is over; 5 runs under a live agent
    assert sweeper.stale(rule) == 2
    _wait_helpers(sweeper)
    assert sorted(log.read_text().split()[4:]) == ["mnp-tok-2", "mnp-tok-3"]
    left = sorted(p.name for p in (tmp_path / "run" / "containers").iterdir())
    assert left == ["mnp-tok-4", "mnp-tok-5"]


def _start_of_parent() -> int:
    p = read_stat(os.getppid())
    assert p is not None
    return p.start


def test_an_mpi_rank_shares_the_hosts_ipc_and_pid_namespaces() -> None:
    """A rank (PMI_PORT passed in) runs with the host's /dev/shm and PIDs, as bare ranks
    do, so MPICH's shared memory and CMA work between the node's containers; no --init
    (the rank is not PID 1 there). PMI_PORT and PMI_ID travel as names, values in env."""
    env = {"PMI_PORT": "127.0.0.1:4000", "PMI_ID": "3"}
    for kind in ("podman", "docker"):
        argv, out = wrap(
            kind, kind, Spec(image="img"), ["a"], env, ["PMI_ID", "PMI_PORT"], None, "n", {}
        )
        assert argv[:7] == [kind, "run", "--rm", "--ipc", "host", "--pid", "host"]
        assert "--init" not in argv and "127.0.0.1:4000" not in argv
        assert out["PMI_PORT"] == "127.0.0.1:4000"
        bare, _ = wrap(kind, kind, Spec(image="img"), ["a"], {}, [], None, "n", {})
        assert "--init" in bare and "--pid" not in bare


def test_cidfile_and_the_kernels_oom_report() -> None:
    """With a memory limit the runtime writes the container's id (`--cidfile`); the
    kernel's OOM report names the cgroup that hit its limit by a path holding that id,
    after the cgroup's usage (what the agent reports)."""
    argv, _ = wrap(
        "podman", "podman", Spec(image="img"), ["a"], {}, [], None, "n", {}, False, "/r/c"
    )
    assert argv[:5] == ["podman", "run", "--rm", "--cidfile", "/r/c"]
    cid = "fe53bf38e7a6" + "0" * 52
    log = [
        "python3 invoked oom-killer: gfp_mask=0xcc0(GFP_KERNEL), order=0",
        "memory: usage 65536kB, limit 65536kB, failcnt 12",
        "oom-kill:constraint=CONSTRAINT_MEMCG,nodemask=(null),cpuset=libpod-x,"
        f"mems_allowed=0,oom_memcg=/libpod_parent/libpod-{cid},task_memcg=/x,task=python3",
        "memory: usage 24576kB, limit 24576kB, failcnt 0",
        "oom-kill:constraint=CONSTRAINT_MEMCG,oom_memcg=/libpod_parent/libpod-other,task=sh",
    ]
    assert oom_usage_in(log, cid) == 64 << 20
    assert oom_usage_in(log, "a" * 64) is None
    assert oom_usage_in([], cid) is None
