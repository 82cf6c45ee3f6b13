"""Inventories: TOML (SPEC §3) → a validated :class:`~mnp.model.Inventory`.

Choices where the spec is silent (also in the README):

- ``address`` is a template: ``%n`` is the host's name, ``%i`` its index
  (from 0) among the names of its ``[[hosts]]`` entry, ``%%`` a literal ``%``:
  ``names = "node[1-4]"`` with ``address = "10.0.0.%i"`` gives 10.0.0.0..3.
  Without it the address is the name (``localhost`` for ``transport = "local"``).
- A ``[[hosts]]`` entry may have an ``ssh`` sub-table; its keys replace the
  ``[ssh]`` ones for those hosts.
- Host names are letters, digits, ``.``, ``-``, ``_`` and cannot start with
  ``-`` or ``.``; at most 10,000 hosts.
- A compute environment takes the hosts named by ``hosts`` plus every host
  carrying any of its ``labels``. A queue without ``compute_environments``
  uses all of them, in inventory order. Queue priorities are 0..1000.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Sequence
from typing import Any

from mnp.model import (
    SSH_CLIENTS,
    ComputeEnvironment,
    HostSpec,
    Inventory,
    JobState,
    ManagedSpec,
    Notification,
    Queue,
    SshOptions,
)
from mnp.spec.fields import (
    NAME_RE,
    Table,
    array_of,
    check_string,
    fail,
    index_path,
    key_path,
    read_toml,
    show,
)
from mnp.spec.nodeset import expand_nodeset, fold_nodeset
from mnp.spec.units import parse_duration, parse_memory

INVENTORY_FIELDS = ("ssh", "hosts", "compute_environments", "queues", "notifications")
NOTIFICATION_FIELDS = ("command", "url", "states", "queues", "job_name")
SSH_FIELDS = (
    "user",
    "port",
    "known_hosts",
    "identity",
    "connect_timeout",
    "python",
    "config",
    "transport",
    "agent_cache",
)
HOST_FIELDS = ("names", "vcpus", "memory", "gpus", "labels", "address", "transport", "ssh")
CE_FIELDS = (
    "type", "hosts", "labels", "state", "provider", "min_vcpus", "max_vcpus", "desired_vcpus",
    "idle_timeout", "allocation", "start", "stop",
)  # fmt: skip
MANAGED_FIELDS = CE_FIELDS[4:]
ALLOCATION_FIELDS = ("nodes", "time_limit", "vcpus_per_node", "options")
CE_TYPES = ("UNMANAGED", "MANAGED")
PROVIDERS = ("slurm", "pbs", "command")
MAX_MANAGED_VCPUS = 10_000_000
DEFAULT_IDLE_TIMEOUT = 300.0
QUEUE_FIELDS = ("priority", "compute_environments", "state")
STATES = ("ENABLED", "DISABLED")
TRANSPORTS = ("ssh", "local", "srun")

MAX_HOSTS = 10_000
MAX_LOCAL_NODES = 1000
MAX_HOST_VCPUS = 100_000
MAX_HOST_GPUS = 1024
HOST_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,252}")
_LABEL_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_USER_RE = re.compile(r"[A-Za-z0-9_.][A-Za-z0-9_.$-]{0,63}")
_ADDRESS_RE = re.compile(r"[A-Za-z0-9_.:\[\]%-]+")
NAME_RULE = "use 1 to 128 letters, digits, - and _"


def load_inventory(path: str | os.PathLike[str]) -> Inventory:
    """Read and validate an inventory file; any problem is a SpecError."""
    data, source = read_toml(path)
    return parse_inventory(data, source)


def local_inventory(nodes: int = 4) -> Inventory:
    """The embedded default: this machine as ``nodes`` virtual hosts ``local-0..N-1``."""
    if isinstance(nodes, bool) or not isinstance(nodes, int) or not 1 <= nodes <= MAX_LOCAL_NODES:
        fail(
            "<command line>",
            "--local-nodes",
            f"{show(nodes)} is out of range; allowed 1..{MAX_LOCAL_NODES}",
        )
    hosts = tuple(
        HostSpec(name=f"local-{i}", address="localhost", transport="local") for i in range(nodes)
    )
    ce = ComputeEnvironment(name="local", hosts=tuple(h.name for h in hosts))
    queue = Queue(name="default", priority=1, compute_environments=("local",))
    return Inventory(
        source="local", hosts=hosts, compute_environments={"local": ce}, queues={"default": queue}
    )


def unverified_warning(inventory: Inventory) -> str | None:
    """The warning every use of an inventory with ``known_hosts = "none"`` gives (SPEC
    "Security"), or None when every SSH host key is verified."""
    names = [
        h.name
        for h in inventory.hosts
        if h.transport == "ssh" and (h.ssh.known_hosts or "").strip().lower() == "none"
    ]
    if not names:
        return None
    return (
        f'{inventory.source}: known_hosts = "none": the SSH host keys of {fold_nodeset(names)} '
        "are NOT verified; anyone on the network path can impersonate them"
    )


def simple_inventory(source: str, hosts: Sequence[HostSpec]) -> Inventory:
    """``hosts`` in one compute environment ``default`` and one queue ``default``."""
    ces = _default_ces(hosts)
    return Inventory(
        source=source, hosts=tuple(hosts), compute_environments=ces, queues=_default_queues(ces)
    )


def _default_ces(hosts: Sequence[HostSpec]) -> dict[str, ComputeEnvironment]:
    return {"default": ComputeEnvironment(name="default", hosts=tuple(h.name for h in hosts))}


def _default_queues(ces: dict[str, ComputeEnvironment]) -> dict[str, Queue]:
    return {"default": Queue(name="default", priority=1, compute_environments=tuple(ces))}


def parse_inventory(data: dict[str, Any], source: str) -> Inventory:
    """Validate ``data`` (a parsed TOML document) read from ``source``."""
    t = Table(source, "", data, INVENTORY_FIELDS, what="a table of inventory fields")
    st = t.table("ssh", SSH_FIELDS)
    ssh = parse_ssh(st, SshOptions()) if st else SshOptions()
    raw_ces = data.get("compute_environments")
    managed_only = isinstance(raw_ces, dict) and any(
        isinstance(c, dict) and c.get("type") == "MANAGED" for c in raw_ces.values()
    )  # its hosts come from the provider: [[hosts]] may be left out
    if "hosts" not in t and not managed_only:
        t.fail(
            "hosts", 'missing; list the machines in [[hosts]] tables, e.g. names = "node[01-04]"'
        )
    items = array_of(source, "hosts", t.get("hosts") or [], "an array of tables ([[hosts]])")
    if not items and not managed_only:
        t.fail("hosts", "empty; list at least one [[hosts]] entry")
    hosts: list[HostSpec] = []
    where: dict[str, int] = {}
    for i, item in enumerate(items):
        ht = Table(source, index_path("hosts", i), item, HOST_FIELDS)
        for host in _host_entry(ht, ssh):
            if host.name in where:
                other = "this entry" if where[host.name] == i else f"hosts[{where[host.name]}]"
                ht.fail(
                    "names", f'host "{host.name}" is also in {other}; host names must be unique'
                )
            where[host.name] = i
            hosts.append(host)
        if len(hosts) > MAX_HOSTS:
            ht.fail("names", f"more than {MAX_HOSTS} hosts in the inventory; allowed {MAX_HOSTS}")
    ces = _compute_environments(t, hosts)
    return Inventory(
        source=source,
        hosts=tuple(hosts),
        compute_environments=ces,
        queues=_queues(t, ces),
        ssh=ssh,
        notifications=_notifications(t),
    )


def _notifications(t: Table) -> tuple[Notification, ...]:
    """``[[notifications]]``: each a ``command`` (argv) or a ``url`` (http/https), and
    optional ``states``, ``queues`` and ``job_name`` (a glob) filters."""
    if "notifications" not in t:
        return ()
    items = array_of(
        t.source, "notifications", t.get("notifications"), "an array of tables ([[notifications]])"
    )
    out = []
    states = [s.value for s in JobState]
    for i, item in enumerate(items):
        nt = Table(t.source, index_path("notifications", i), item, NOTIFICATION_FIELDS)
        command = nt.strings("command")
        url = nt.string("url", None)
        if (command is None) == (url is None):
            nt.fail("command", 'give either command = ["prog", "arg"] or url = "https://..."')
        if command is not None and not command:
            nt.fail("command", 'empty; give the program and its arguments, e.g. ["notify-send"]')
        if url is not None and not url.startswith(("http://", "https://")):
            nt.fail("url", f"{show(url)} is not allowed; give an http:// or https:// URL")
        wanted = nt.strings("states", single_ok=True)
        if wanted is not None:
            for j, st in enumerate(wanted):
                if st.upper() not in states:
                    f = index_path(nt.field("states"), j)
                    fail(t.source, f, f"{show(st)} is not a state; allowed: {', '.join(states)}")
            wanted = tuple(st.upper() for st in wanted)
        out.append(
            Notification(
                command=command,
                url=url,
                states=wanted,
                queues=nt.strings("queues", single_ok=True),
                job_name=nt.string("job_name", None),
            )
        )
    return tuple(out)


def parse_ssh(st: Table, base: SshOptions) -> SshOptions:
    """``base`` with the keys of an ``[ssh]`` table replaced."""
    changes: dict[str, Any] = {}
    if "user" in st:
        changes["user"] = st.string(
            "user", None, pattern=_USER_RE, rule="use a user name (letters, digits, ., _, -)"
        )
    if "port" in st:
        changes["port"] = st.integer("port", None, 1, 65535)
    if "known_hosts" in st:
        known = st.string("known_hosts", "")
        if not known.strip():
            st.fail(
                "known_hosts", 'empty; give a known_hosts file, or "none" to skip host key checks'
            )
        changes["known_hosts"] = "none" if known.lower() == "none" else known
    for key in ("identity", "config"):
        paths = st.strings(key, single_ok=True)
        if paths is not None:
            for j, p in enumerate(paths):
                if not p.strip():
                    fail(st.source, index_path(st.field(key), j), "empty path")
            changes[key] = paths
    if "connect_timeout" in st:
        timeout = st.convert("connect_timeout", 0.0, parse_duration)
        if timeout <= 0:
            st.fail("connect_timeout", "must be more than 0s, e.g. 10s")
        changes["connect_timeout"] = timeout
    if "python" in st:
        python = st.string("python", "")
        if not python.strip() or not python.isprintable():
            st.fail("python", 'give the remote Python to run the agent, e.g. "python3"')
        changes["python"] = python
    if "transport" in st:
        changes["transport"] = st.choice("transport", base.transport, SSH_CLIENTS)
    if "agent_cache" in st:
        cache = st.string("agent_cache", "")
        if not cache.strip() or not cache.isprintable():
            st.fail(
                "agent_cache",
                'give a folder on the hosts (e.g. "~/.cache/mnp"), or "none" to ship the '
                "agent on every start",
            )
        changes["agent_cache"] = "none" if cache.lower() == "none" else cache
    return dataclasses.replace(base, **changes)


def _auto_or(ht: Table, key: str, lo: int, hi: int) -> int | None:
    value = ht.get(key)
    if value is None or (isinstance(value, str) and value.lower() == "auto"):
        return None
    if isinstance(value, str):
        ht.fail(key, f'{show(value)} is not allowed; use "auto" or a whole number {lo}..{hi}')
    return ht.integer(key, None, lo, hi)


def _host_entry(ht: Table, ssh: SshOptions) -> list[HostSpec]:
    if "names" not in ht:
        ht.fail("names", 'missing; give the host names as a nodeset, e.g. "node[01-16]"')
    names = host_names(ht.source, ht.field("names"), ht.get("names"))
    memory_value = ht.get("memory")
    memory = None
    if not (isinstance(memory_value, str) and memory_value.strip().lower() == "auto"):
        memory = ht.convert("memory", None, parse_memory)
    transport = ht.choice("transport", "ssh", TRANSPORTS)
    template = ht.string("address", None)
    if template is not None:
        _check_template(ht, template)
    sub = ht.table("ssh", SSH_FIELDS)
    host_ssh = parse_ssh(sub, ssh) if sub else ssh
    labels = (
        ht.strings("labels", pattern=_LABEL_RE, rule="use 1 to 64 letters, digits, ., _ and -")
        or ()
    )
    vcpus = _auto_or(ht, "vcpus", 1, MAX_HOST_VCPUS)
    gpus = _auto_or(ht, "gpus", 0, MAX_HOST_GPUS)
    default_address = "localhost" if transport == "local" else None
    return [
        HostSpec(
            name=name,
            address=_address(template, name, i) if template else (default_address or name),
            vcpus=vcpus,
            memory=memory,
            gpus=gpus,
            labels=labels,
            transport=transport,
            ssh=host_ssh,
        )
        for i, name in enumerate(names)
    ]


def host_names(source: str, field: str, value: object) -> list[str]:
    """Expand a nodeset (or a list of them) into host names, checking each name."""
    specs = value if isinstance(value, list) else [value]
    names: list[str] = []
    for j, spec in enumerate(specs):
        f = index_path(field, j) if isinstance(value, list) else field
        spec = check_string(source, f, spec)
        try:
            expanded = expand_nodeset(spec)
        except ValueError as e:
            fail(source, f, str(e))
        for name in expanded:
            if not HOST_NAME_RE.fullmatch(name):
                fail(
                    source,
                    f,
                    f"{show(name)} is not a host name; use letters, digits, ., _ and "
                    "-, starting with a letter, digit or _",
                )
        names.extend(expanded)
        if len(names) > MAX_HOSTS:
            fail(source, f, f"more than {MAX_HOSTS} hosts; allowed {MAX_HOSTS}")
    if not names:
        fail(source, field, "empty; give at least one host name")
    return names


def _check_template(ht: Table, template: str) -> None:
    if not template or not _ADDRESS_RE.fullmatch(template) or template.startswith("-"):
        ht.fail(
            "address",
            f"{show(template)} is not an address; use a host name or IP, with %n "
            "for the host's name and %i for its index in this entry",
        )
    rest = re.sub(r"%[ni%]", "", template)
    if "%" in rest:
        ht.fail("address", "unknown % escape; use %n (host name), %i (index) or %% (a % sign)")


def _address(template: str, name: str, index: int) -> str:
    return re.sub(
        r"%[ni%]", lambda m: {"%n": name, "%i": str(index), "%%": "%"}[m.group()], template
    )


def _compute_environments(t: Table, hosts: list[HostSpec]) -> dict[str, ComputeEnvironment]:
    table = t.mapping("compute_environments")
    if table is None:
        return _default_ces(hosts)
    if not table:
        t.fail(
            "compute_environments",
            "empty; define [compute_environments.NAME] tables or leave "
            "it out (then every host is in one compute environment, default)",
        )
    known = {h.name for h in hosts}
    all_labels = sorted({label for h in hosts for label in h.labels})
    out: dict[str, ComputeEnvironment] = {}
    for name, value in table.items():
        field = key_path("compute_environments", name)
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):
            fail(t.source, field, f"not a valid compute environment name; {NAME_RULE}")
        ct = Table(t.source, field, value, CE_FIELDS)
        if ct.choice("type", "UNMANAGED", CE_TYPES) == "MANAGED":
            state = ct.choice("state", "ENABLED", STATES)
            out[name] = ComputeEnvironment(name=name, hosts=(), state=state, managed=_managed(ct))
            continue
        for key in MANAGED_FIELDS:
            if key in ct:
                ct.fail(key, 'only for type = "MANAGED"; an UNMANAGED environment has its hosts')
        if "hosts" not in ct and "labels" not in ct:
            fail(t.source, field, "give hosts (a nodeset) or labels (a list), or both")
        chosen: set[str] = set()
        if "hosts" in ct:
            listed = host_names(t.source, ct.field("hosts"), ct.get("hosts"))
            unknown = [n for n in listed if n not in known]
            if unknown:
                ct.fail(
                    "hosts",
                    f"{_few(unknown)} not in [[hosts]]; inventory hosts: {_few(sorted(known))}",
                )
            chosen.update(listed)
        labels = ct.strings("labels", pattern=_LABEL_RE, rule="use a label from [[hosts]]") or ()
        for j, label in enumerate(labels):
            if label not in all_labels:
                fail(
                    t.source,
                    index_path(ct.field("labels"), j),
                    f'no host has label "{label}"; labels in use: '
                    f"{', '.join(all_labels) or 'none'}",
                )
        members = tuple(
            h.name for h in hosts if h.name in chosen or any(lb in labels for lb in h.labels)
        )
        if "labels" in ct and not labels and not chosen:
            ct.fail("labels", "empty; give at least one label")
        out[name] = ComputeEnvironment(
            name=name, hosts=members, state=ct.choice("state", "ENABLED", STATES)
        )
    return out


def _managed(ct: Table) -> ManagedSpec:
    """The fields of a ``type = "MANAGED"`` compute environment (README "Managed")."""
    for key in ("hosts", "labels"):
        if key in ct:
            ct.fail(
                key,
                "a MANAGED compute environment gets its hosts from its provider; leave "
                f'{key} out, or use type = "UNMANAGED"',
            )
    if "provider" not in ct:
        ct.fail("provider", f"missing; a MANAGED compute environment needs one of {_or(PROVIDERS)}")
    provider = ct.choice("provider", "", PROVIDERS)
    if "max_vcpus" not in ct:
        ct.fail("max_vcpus", "missing; give the most vCPUs it may acquire, e.g. 64")
    top = ct.integer("max_vcpus", 0, 1, MAX_MANAGED_VCPUS)
    low = ct.integer("min_vcpus", 0, 0, MAX_MANAGED_VCPUS)
    if low > top:
        ct.fail("min_vcpus", f"{low} is more than max_vcpus ({top}); allowed 0..{top}")
    desired = ct.integer("desired_vcpus", low, 0, MAX_MANAGED_VCPUS)
    if not low <= desired <= top:
        ct.fail("desired_vcpus", f"{desired} is out of range; allowed {low}..{top} (min..max)")
    idle = ct.convert("idle_timeout", DEFAULT_IDLE_TIMEOUT, parse_duration)
    at = ct.table("allocation", ALLOCATION_FIELDS)
    nodes, time_limit, per_node = 1, None, None
    options: tuple[str, ...] = ()
    if at is not None:
        nodes = at.integer("nodes", 1, 1, MAX_HOSTS)
        time_limit = at.convert("time_limit", None, parse_duration)
        if time_limit is not None and time_limit < 60:
            at.fail("time_limit", "less than 1m; Slurm and PBS count whole minutes, e.g. 1h")
        per_node = at.integer("vcpus_per_node", None, 1, MAX_HOST_VCPUS)
        options = at.strings("options") or ()
        if options and provider == "command":
            at.fail("options", 'only for "slurm" and "pbs"; give a command\'s arguments in '
                    "its start/stop arrays")  # fmt: skip
        for j, opt in enumerate(options):
            if not opt.strip() or not opt.isprintable():
                fail(ct.source, index_path(at.field("options"), j), "empty or not printable")
        if per_node is not None and nodes * per_node > top:
            at.fail(
                "nodes",
                f"{nodes} nodes of {per_node} vCPUs is more than max_vcpus ({top}); "
                f"allowed at most {max(top // per_node, 1)} nodes",
            )
    programs: dict[str, tuple[str, ...]] = {}
    for key in ("start", "stop"):
        argv = ct.strings(key)
        if provider != "command":
            if argv is not None:
                ct.fail(key, f'only for provider = "command"; {provider} needs no program')
            continue
        if not argv or not argv[0].strip():
            example = "nodes-up" if key == "start" else "nodes-down"
            ct.fail(key, f'missing or empty; provider = "command" needs the {key} program as '
                    f'an array, e.g. ["/usr/local/bin/{example}"]')  # fmt: skip
        programs[key] = argv
    return ManagedSpec(
        provider=provider,
        max_vcpus=top,
        min_vcpus=low,
        desired_vcpus=desired,
        idle_timeout=idle,
        nodes=nodes,
        time_limit=time_limit,
        vcpus_per_node=per_node,
        options=options,
        start=programs.get("start", ()),
        stop=programs.get("stop", ()),
    )


def _or(choices: Sequence[str]) -> str:
    return ", ".join(f'"{c}"' for c in choices[:-1]) + f' or "{choices[-1]}"'


def _few(names: Sequence[str]) -> str:
    folded = fold_nodeset(names)
    return folded if len(folded) <= 80 else folded[:77] + "..."


def _queues(t: Table, ces: dict[str, ComputeEnvironment]) -> dict[str, Queue]:
    table = t.mapping("queues")
    if table is None:
        return _default_queues(ces)
    if not table:
        t.fail(
            "queues",
            "empty; define [queues.NAME] tables or leave it out (then one queue, "
            "default, uses every compute environment)",
        )
    out: dict[str, Queue] = {}
    for name, value in table.items():
        field = key_path("queues", name)
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):
            fail(t.source, field, f"not a valid queue name; {NAME_RULE}")
        qt = Table(t.source, field, value, QUEUE_FIELDS)
        names = qt.strings("compute_environments", single_ok=True)
        if names is None:
            names = tuple(ces)
        if not names:
            qt.fail("compute_environments", "empty; list at least one compute environment")
        for j, ce in enumerate(names):
            f = index_path(qt.field("compute_environments"), j)
            if ce not in ces:
                fail(t.source, f, f'"{ce}" is not a compute environment; defined: {", ".join(ces)}')
            if names.index(ce) != j:
                fail(t.source, f, f'"{ce}" is listed twice; list each once')
        out[name] = Queue(
            name=name,
            priority=qt.integer("priority", 1, 0, 1000),
            compute_environments=names,
            state=qt.choice("state", "ENABLED", STATES),
        )
    return out
