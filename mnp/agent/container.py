"""Running a task in a container: the runtime's argv, built on the node.

A `spawn` that carries `container` (see PROTOCOL.md) runs its argv inside the image
through the container runtime found on this node. The task inside sees what a bare
task sees (SPEC §5): the variables the controller set (`MNP_*`, hostfiles, torch,
`AWS_BATCH_*`, its definition's environment, secrets), its working directory (bind
mounted at the same path), the host's network, and its GPUs. Values never appear on
the runtime's command line (a secret would show in `ps`): podman and docker are given
`--env NAME` and read the value from their own environment, apptainer reads
`APPTAINERENV_NAME`.

podman and docker run the container with `--rm` and `--init` (so SIGTERM reaches the
task, not a PID 1 that ignores it; the agent signals the container's processes, not the
client: see `containers.Containers.spare`), named `mnp-<controller>-<tid>` and labelled with
the job, task, controller and agent: a teardown removes it by name (`rm -f`), a later
agent by its marker in the run directory (see `Containers`). apptainer runs the task
as a child process, which the agent's own teardown covers.

Pure functions, standard library only (python3.8): they are golden-tested.
"""

from __future__ import annotations

import json
import os
import re

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs milliseconds to import; annotations are strings here
    from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple


RUNTIMES = ("podman", "docker", "apptainer")
"""What `auto` looks for, in this order."""
TAGS = ("MNP_JOB_ID", "MNP_CONTROLLER_ID", "MNP_AGENT_ID")
"""Always passed in: they tag the container's processes for the agent's sweeps."""
MEMORY_VAR = "MNP_MEMORY_LIMIT"  # as limits.py: the task's memory limit, bytes
CPUS_VAR = "MNP_CPUS"  # as limits.py: the CPUs it is pinned to ("0,3")
_NAME_BAD = re.compile(r"[^A-Za-z0-9_.-]")


class ContainerError(Exception):
    """The container cannot be started: `code` is what `exited` reports (127: no
    runtime, 126: a bad request)."""

    def __init__(self, code: int, msg: str) -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg


class Spec:
    """A spawn message's `container`, checked."""

    __slots__ = ("image", "runtime", "mounts", "options", "gpus")

    def __init__(
        self,
        image: str,
        runtime: str = "auto",
        mounts: Sequence[str] = (),
        options: Sequence[str] = (),
        gpus: Sequence[int] = (),
    ) -> None:
        self.image = image
        self.runtime = runtime
        self.mounts = list(mounts)
        self.options = list(options)
        self.gpus = list(gpus)

    @classmethod
    def from_message(cls, value: Any) -> Spec:
        """ValueError (its text: what is wrong) when `value` is not a valid `container`."""
        if not isinstance(value, dict):
            raise ValueError("container must be an object")
        image = value.get("image")
        if not isinstance(image, str) or not image or image.startswith("-") or "\0" in image:
            raise ValueError("container.image must be an image reference")
        runtime = value.get("runtime", "auto")
        if runtime not in ("auto",) + RUNTIMES:
            raise ValueError("container.runtime must be auto, podman, docker or apptainer")
        mounts = _strings(value, "mounts")
        for m in mounts:
            parts = m.split(":")
            if not (
                len(parts) in (2, 3)
                and parts[0].startswith("/")
                and parts[1].startswith("/")
                and (len(parts) == 2 or parts[2] in ("ro", "rw"))
            ):
                raise ValueError("container.mounts: %r is not HOST:CONTAINER[:ro]" % m)
        gpus = value.get("gpus") or []
        if not (
            isinstance(gpus, list)
            and all(isinstance(g, int) and not isinstance(g, bool) and g >= 0 for g in gpus)
        ):
            raise ValueError("container.gpus must be a list of GPU indices")
        return cls(image, runtime, mounts, _strings(value, "options"), gpus)


def _strings(value: Dict[str, Any], key: str) -> List[str]:
    items = value.get(key) or []
    if not (isinstance(items, list) and all(isinstance(s, str) and "\0" not in s for s in items)):
        raise ValueError("container.%s must be a list of strings" % key)
    return items


def find_runtime(wanted: str, path: Optional[str]) -> Tuple[str, str]:
    """(kind, executable) of the runtime `wanted` (`auto`: the first of RUNTIMES) on
    `path`; ContainerError 127 when there is none."""
    for kind in RUNTIMES if wanted == "auto" else (wanted,):
        exe = _which(kind, path)
        if exe is not None:
            return kind, exe
    if wanted == "auto":
        raise ContainerError(
            127, "no container runtime on this host (looked for %s on PATH)" % ", ".join(RUNTIMES)
        )
    raise ContainerError(127, "%s: container runtime not found on PATH" % wanted)


def _which(name: str, path: Optional[str]) -> Optional[str]:
    for entry in (path if path is not None else os.defpath).split(os.pathsep):
        candidate = os.path.join(entry or ".", name)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def container_name(ctl: str, tid: str) -> str:
    """`mnp-<controller>-<tid>`, in the characters podman and docker allow in a name
    (`42#3.1` → `42_n3.1`, `42:7` → `42_a7`): unique per controller and task on a host."""
    safe = tid.replace("#", "_n").replace(":", "_a")
    return _NAME_BAD.sub("_", "mnp-%s-%s" % (ctl[:16], safe))


def forwarded(changes: Mapping[str, Optional[str]]) -> List[str]:
    """The variables the task inside sees: those the controller set (not unset), and
    the tags; sorted, so the argv is the same for the same spawn."""
    names = {k for k, v in changes.items() if v is not None}
    names.update(TAGS)
    return sorted(names)


def wrap(
    kind: str,
    exe: str,
    spec: Spec,
    argv: Sequence[str],
    env: Mapping[str, str],
    names: Sequence[str],
    cwd: Optional[str],
    name: str,
    labels: Mapping[str, str],
    interactive: bool = False,
    cidfile: Optional[str] = None,
) -> Tuple[List[str], Dict[str, str]]:
    """(argv, environment) of the runtime process that runs `argv` in `spec.image`.

    `env` is the task's environment on the host (what a bare task would get); `names`
    the variables passed in (values through the runtime's environment, never argv);
    `cwd` the working directory, bind-mounted at the same path (unless it is `/`).

    podman and docker enforce the task's `MNP_MEMORY_LIMIT` and `MNP_CPUS` themselves
    (`--memory`, `--memory-swap`, `--cpuset-cpus`): the container's processes are the
    runtime's, outside the cgroup and affinity the agent gives the task's client.
    apptainer's are the task's own, and inherit those (limits.py). `cidfile`: the
    runtime writes the container's id there (`--cidfile`), which names its memory
    cgroup in the kernel's OOM report (`containers.Containers.exited`).
    """
    if kind == "apptainer":
        return _apptainer(exe, spec, argv, env, names, cwd)
    out_env = dict(env)
    rank = "PMI_PORT" in names  # an MPI rank (ranks.py)
    cmd = [exe, "run", "--rm"]
    if cidfile is not None:  # where the runtime writes the container's id (oom.py)
        cmd += ["--cidfile", cidfile]
    if rank:
        # the node's ranks share /dev/shm and read each other's memory (CMA), as bare
        # ranks do: the host's IPC and PID namespaces, where the rank is no PID 1
        cmd += ["--ipc", "host", "--pid", "host"]
    else:
        cmd.append("--init")
    cmd += ["--network", "host", "--name", name]
    if kind == "podman":
        cmd.append("--replace")  # a left-over container of a killed agent, same tid
    for key in sorted(labels):
        cmd += ["--label", "%s=%s" % (key, labels[key])]
    if interactive:
        cmd.append("-i")
    if cwd is not None:
        cmd += ["-w", cwd]
    for n in names:
        cmd += ["--env", n]
    for m in _mounts(spec.mounts, cwd):
        cmd += ["-v", m]
    memory = env.get(MEMORY_VAR, "")
    if memory.isdigit() and int(memory) > 0:
        cmd += ["--memory", memory, "--memory-swap", memory]  # no swapping around it
    cpus = env.get(CPUS_VAR, "")
    if cpus and all(c.strip().isdigit() for c in cpus.split(",")):
        cmd += ["--cpuset-cpus", cpus]
    if spec.gpus:
        if kind == "podman":
            for g in spec.gpus:
                cmd += ["--device", "nvidia.com/gpu=%d" % g]
        else:
            ids = ",".join(str(g) for g in spec.gpus)
            # docker splits the value at commas unless the list is quoted
            cmd += ["--gpus", "device=%s" % ids if len(spec.gpus) == 1 else '"device=%s"' % ids]
        if "CUDA_VISIBLE_DEVICES" in names:
            # the container sees only its GPUs, numbered from 0
            out_env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(len(spec.gpus)))
    cmd += spec.options
    cmd.append(spec.image)
    cmd += argv
    return cmd, out_env


def _apptainer(
    exe: str,
    spec: Spec,
    argv: Sequence[str],
    env: Mapping[str, str],
    names: Sequence[str],
    cwd: Optional[str],
) -> Tuple[List[str], Dict[str, str]]:
    # --cleanenv: the host's environment stays out, as with podman and docker; what the
    # task sees comes in as APPTAINERENV_NAME. All GPUs are visible with --nv:
    # CUDA_VISIBLE_DEVICES (host indices) selects the task's.
    out_env = dict(env)
    for n in names:
        if n in env:
            out_env["APPTAINERENV_" + n] = env[n]
    cmd = [exe, "exec", "--cleanenv"]
    if spec.gpus:
        cmd.append("--nv")
    for m in _mounts(spec.mounts, cwd):
        cmd += ["--bind", m]
    if cwd is not None:
        cmd += ["--pwd", cwd]
    cmd += spec.options
    cmd.append(spec.image)
    cmd += argv
    return cmd, out_env


def _mounts(mounts: Sequence[str], cwd: Optional[str]) -> List[str]:
    """The definition's mounts, and the working directory at the same path first (unless
    it is `/`, or a mount already puts something there)."""
    out = list(mounts)
    if cwd is not None and cwd != "/" and not any(m.split(":")[1] == cwd for m in mounts):
        out.insert(0, "%s:%s" % (cwd, cwd))
    return out


def marker(name: str, kind: str, exe: str, tid: str, agent: str) -> str:
    """What the run directory's marker of a container holds (JSON, one line)."""
    return json.dumps({"name": name, "runtime": kind, "exe": exe, "tid": tid, "agent": agent})
