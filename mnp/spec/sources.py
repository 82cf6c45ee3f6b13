"""Inventories from where mnp runs: a Slurm or PBS allocation, a hostfile, or ``auto``.

``--inventory`` takes ``local`` (the default), a TOML file, ``slurm``,
``pbs``, ``hostfile:PATH`` or ``auto`` (slurm, then pbs, then the file or
source named by ``MNP_INVENTORY``, then local). Hosts found this way are in one
compute environment ``default`` and one queue ``default``; they use the ssh
transport with default options, except the nodes of a Slurm allocation mnp runs
in (``SLURM_JOB_ID`` set), which use ``srun`` (job steps, no SSH) unless
``MNP_SLURM_TRANSPORT=ssh``. Environment variables are read from ``environ`` so
tests can pass a dict.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

from mnp.files import NotARegularFile, read_regular
from mnp.model import HostSpec, Inventory
from mnp.spec.fields import fail, show
from mnp.spec.inventory import (
    MAX_HOST_GPUS,
    MAX_HOSTS,
    host_names,
    load_inventory,
    local_inventory,
    simple_inventory,
)
from mnp.spec.nodeset import expand_slurm_cpus

MAX_HOSTFILE_BYTES = 16 * 1024 * 1024
INVENTORY_CHOICES = "--inventory takes a TOML file, local, slurm, pbs, hostfile:PATH or auto"
_OMPI_SLOTS = re.compile(r"(?:slots|max[-_]slots)=(\d{1,9})", re.A)


def resolve_inventory(
    spec: str | None, local_nodes: int = 4, environ: Mapping[str, str] = os.environ
) -> Inventory:
    """The inventory named by ``--inventory`` (``None`` = not given = local)."""
    if spec is None or spec.strip() == "" or spec == "local":
        return local_inventory(local_nodes)
    if spec == "slurm":
        return slurm_inventory(environ)
    if spec == "pbs":
        return pbs_inventory(environ)
    if spec.startswith("hostfile:"):
        return hostfile_inventory(spec[len("hostfile:") :])
    if spec == "auto":
        if environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST"):
            return slurm_inventory(environ)
        if environ.get("PBS_NODEFILE"):
            return pbs_inventory(environ)
        named = environ.get("MNP_INVENTORY", "").strip()
        if named and named != "auto":
            return resolve_inventory(named, local_nodes, environ)
        return local_inventory(local_nodes)
    path = os.path.expanduser(spec)
    if not os.path.exists(path):
        fail(spec, "", f"no such file; {INVENTORY_CHOICES}")
    return load_inventory(path)


def slurm_inventory(environ: Mapping[str, str] = os.environ) -> Inventory:
    """The nodes of the Slurm allocation mnp runs in.

    ``SLURM_JOB_NODELIST`` (or ``SLURM_NODELIST``) gives the hosts,
    ``SLURM_JOB_CPUS_PER_NODE`` their vcpus, ``SLURM_GPUS_ON_NODE`` their GPUs
    (Slurm only tells it for this node; it is assumed for all) and
    ``SLURM_MEM_PER_NODE`` (MiB) their memory. Anything missing is ``auto``.
    The transport is ``srun`` when mnp runs inside that allocation (``SLURM_JOB_ID``), else
    ``ssh``; ``MNP_SLURM_TRANSPORT`` (``srun`` or ``ssh``) chooses it.
    """
    var = "SLURM_JOB_NODELIST" if environ.get("SLURM_JOB_NODELIST") else "SLURM_NODELIST"
    nodelist = environ.get(var, "")
    if not nodelist.strip():
        fail(
            "slurm",
            "SLURM_JOB_NODELIST",
            "not set; --inventory slurm works only inside a Slurm allocation (salloc, sbatch)",
        )
    names = host_names("slurm", var, nodelist)
    cpus: list[int | None] = [None] * len(names)
    cpu_text = environ.get("SLURM_JOB_CPUS_PER_NODE", "")
    if cpu_text.strip():
        try:
            counts = expand_slurm_cpus(cpu_text)
        except ValueError as e:
            fail("slurm", "SLURM_JOB_CPUS_PER_NODE", str(e))
        if len(counts) != len(names) or 0 in counts:
            fail(
                "slurm",
                "SLURM_JOB_CPUS_PER_NODE",
                f"{show(cpu_text)} gives {len(counts)} counts for {len(names)} nodes in {var}; "
                "expected one count (at least 1) per node",
            )
        cpus = list(counts)
    gpus = _env_int(environ, "SLURM_GPUS_ON_NODE", 0, MAX_HOST_GPUS)
    mem_mib = _env_int(environ, "SLURM_MEM_PER_NODE", 1, 1 << 40)
    transport = _slurm_transport(environ)
    hosts = [
        HostSpec(
            name=n,
            address=n,
            vcpus=c,
            gpus=gpus,
            memory=mem_mib << 20 if mem_mib is not None else None,
            transport=transport,
        )
        for n, c in zip(names, cpus, strict=True)
    ]
    return simple_inventory("slurm", hosts)


def _slurm_transport(environ: Mapping[str, str]) -> str:
    chosen = environ.get("MNP_SLURM_TRANSPORT", "").strip()
    inside = bool((environ.get("SLURM_JOB_ID") or environ.get("SLURM_JOBID") or "").strip())
    if not chosen:
        return "srun" if inside else "ssh"
    if chosen not in ("srun", "ssh"):
        fail("slurm", "MNP_SLURM_TRANSPORT", f"{show(chosen)} is not allowed; use srun or ssh")
    if chosen == "srun" and not inside:
        fail(
            "slurm",
            "MNP_SLURM_TRANSPORT",
            "srun needs the allocation's SLURM_JOB_ID, which is not set; use ssh",
        )
    return chosen


def pbs_inventory(environ: Mapping[str, str] = os.environ) -> Inventory:
    """The nodes of the PBS/Torque allocation: ``PBS_NODEFILE`` has one line per slot."""
    path = environ.get("PBS_NODEFILE", "")
    if not path.strip():
        fail("pbs", "PBS_NODEFILE", "not set; --inventory pbs works only inside a PBS job (qsub)")
    hosts = _read_hostfile(path, pbs=True)
    return simple_inventory("pbs", hosts)


def hostfile_inventory(path: str) -> Inventory:
    """Hosts from an MPICH (``host:N``) or Open MPI (``host slots=N``) hostfile.

    ``#`` starts a comment; blank lines are ignored; a host listed on several
    lines gets the sum of its slots (a line without a count is one slot). A
    host listed once without a count has ``auto`` vcpus.
    """
    if not path.strip():
        fail("<command line>", "--inventory", "hostfile: needs a path; use hostfile:PATH")
    return simple_inventory(f"hostfile:{path}", _read_hostfile(os.path.expanduser(path), pbs=False))


def _read_hostfile(path: str, *, pbs: bool) -> list[HostSpec]:
    try:
        raw = read_regular(path, MAX_HOSTFILE_BYTES)
    except FileNotFoundError:
        fail(path, "", "no such file")
    except NotARegularFile as e:
        fail(path, "", f"is {e.kind}; expected a hostfile")
    except OSError as e:
        fail(path, "", f"cannot read: {e.strerror or e}")
    if len(raw) > MAX_HOSTFILE_BYTES:
        fail(path, "", "larger than 16 MiB; not a hostfile")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        fail(path, str(raw.count(b"\n", 0, e.start) + 1), "not UTF-8 text")
    slots: dict[str, list[int | None]] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, count = _hostfile_line(path, lineno, line, pbs)
        slots.setdefault(name, []).append(count)
        if len(slots) > MAX_HOSTS:
            fail(path, str(lineno), f"more than {MAX_HOSTS} hosts; allowed {MAX_HOSTS}")
    if not slots:
        fail(path, "", "no hosts; expected one host per line (host, host:N or host slots=N)")
    hosts = []
    for name, counts in slots.items():
        vcpus = None if counts == [None] else sum(c if c is not None else 1 for c in counts)
        hosts.append(HostSpec(name=name, address=name, vcpus=vcpus))
    return hosts


def _hostfile_line(path: str, lineno: int, line: str, pbs: bool) -> tuple[str, int | None]:
    where = str(lineno)
    words = line.split()
    name, count = words[0], None
    if pbs:
        if len(words) > 1:
            fail(path, where, f"{show(line)} is not a host name; expected one host per line")
        count = 1
    else:
        if ":" in name:
            name, _, number = name.partition(":")
            if not number.isascii() or not number.isdigit() or len(number) > 9:
                fail(path, where, f"{show(words[0])} is not host:N; N must be a whole number")
            count = int(number)
        for word in words[1:]:
            m = _OMPI_SLOTS.fullmatch(word)
            if not m:
                fail(
                    path, where, f"{show(word)} is not understood; use host, host:N or host slots=N"
                )
            if word.startswith("slots"):
                count = int(m.group(1))
        if count == 0:
            fail(path, where, "0 slots; a host needs at least 1")
    if not name or "[" in name or "," in name:
        fail(path, where, f"{show(name)} is not a host name")
    host_names(path, where, name)  # checks the characters
    return name, count


def _env_int(environ: Mapping[str, str], var: str, lo: int, hi: int) -> int | None:
    text = environ.get(var, "").strip()
    if not text:
        return None
    if not text.isascii() or not text.isdigit() or len(text) > 15 or not lo <= int(text) <= hi:
        fail("slurm", var, f"{show(text)} is not a whole number {lo}..{hi}")
    return int(text)
