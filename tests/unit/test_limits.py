"""Resources that are limits (issue 14): the pure parts -- which cores a task is pinned
to, how a definition and an override set `cpu_bind`, the agent's parsing and reasons."""

from __future__ import annotations

import pytest

from mnp.agent.limits import OOM, oom_reason, parse_cpus
from mnp.model import Resources
from mnp.sched.alloc import HostCapacity, choose_cores
from mnp.spec.overrides import apply_overrides, definition_from_command


@pytest.mark.parametrize(
    ("cpus", "use", "n", "want"),
    [
        ((0, 1, 2, 3), {}, 1, (0,)),
        ((0, 1, 2, 3), {0: 1}, 1, (1,)),
        ((0, 1, 2, 3), {0: 1, 1: 1}, 2, (2, 3)),
        ((0, 1, 2, 3), {0: 1, 1: 1, 2: 1, 3: 1}, 1, (0,)),  # all busy: shares the first
        ((0, 1, 2, 3), {0: 2, 1: 1, 2: 1, 3: 1}, 1, (1,)),  # ...the least shared one
        ((4, 6), {}, 5, (4, 6)),  # more than the host has: all of them
        ((0, 1), {}, 0, (0,)),  # at least one
        ((3, 1, 2), {3: 1}, 2, (1, 2)),  # in the host's order, returned sorted
    ],
)
def test_choose_cores(
    cpus: tuple[int, ...], use: dict[int, int], n: int, want: tuple[int, ...]
) -> None:
    assert choose_cores(cpus, use, n) == want


def test_grants_get_disjoint_cores_while_the_host_has_enough() -> None:
    host = HostCapacity("h", vcpus=4, memory=0, cpus=(0, 1, 2, 3))
    res = Resources(vcpus=1.5, cpu_bind="cores")  # ceil(1.5) = 2 cores each
    a = host.take(res, False)
    b = host.take(res, False)
    assert (a.cpus, b.cpus) == ((0, 1), (2, 3))
    host.give(a)
    c = host.take(Resources(vcpus=1, cpu_bind="cores"), False)
    assert c.cpus == (0,)  # the freed ones are chosen again
    assert host.cpu_use == {0: 1, 2: 1, 3: 1}
    assert host.take(Resources(vcpus=0.5), False).cpus == ()  # cpu_bind none: unbound


def test_cpu_bind_in_a_definition_and_as_an_override() -> None:
    defn = definition_from_command(["true"], cpu_bind="cores", vcpus=2)
    assert defn.resources.cpu_bind == "cores"
    assert definition_from_command(["true"]).resources.cpu_bind == "none"
    assert apply_overrides(defn, cpu_bind="none").resources.cpu_bind == "none"


def test_agent_parses_cpus_and_names_the_oom() -> None:
    assert parse_cpus("0,3, 5") == [0, 3, 5]
    assert parse_cpus("0-3") == []
    reason = oom_reason(300 << 20, 64 << 20)
    assert reason.startswith("OutOfMemoryError: ") and reason.startswith(OOM)
    assert "300.0 MiB" in reason and "64.0 MiB" in reason
