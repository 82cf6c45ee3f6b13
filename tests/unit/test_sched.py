"""The scheduler as a pure function: tables of cases, milliseconds each."""

from __future__ import annotations

import pytest

from mnp.model import ComputeEnvironment, ManagedSpec, Queue, Resources
from mnp.sched.alloc import HostCapacity
from mnp.sched.decide import Request, could_ever_run, decide

R1 = Resources(vcpus=1)


def cluster(n: int, vcpus: float = 2, gpus: int = 0) -> dict[str, HostCapacity]:
    return {
        f"h{i}": HostCapacity(f"h{i}", vcpus=vcpus, memory=8 << 30, gpus=tuple(range(gpus)))
        for i in range(n)
    }


def env(
    hosts: dict[str, HostCapacity], **queues: int
) -> tuple[dict[str, Queue], dict[str, ComputeEnvironment]]:
    ces = {"ce": ComputeEnvironment("ce", tuple(hosts))}
    qs = {q: Queue(q, prio, ("ce",)) for q, prio in (queues or {"default": 1}).items()}
    return qs, ces


def single(key: str, seq: int, queue: str = "default", res: Resources = R1) -> Request:
    return Request(key, queue, seq, (res,))


def mnp_job(
    key: str, seq: int, nodes: int, queue: str = "default", exclusive: bool = True
) -> Request:
    return Request(key, queue, seq, (R1,) * nodes, exclusive=exclusive)


def test_fifo_fills_hosts_in_order() -> None:
    hosts = cluster(2)
    qs, ces = env(hosts)
    starts = decide([single(f"j{i}", i) for i in range(6)], qs, ces, hosts)
    assert [s.key for s in starts] == ["j0", "j1", "j2", "j3"]
    assert [s.grants[0].host for s in starts] == ["h0", "h0", "h1", "h1"]


def test_requests_are_ordered_by_seq_not_by_arrival() -> None:
    hosts = cluster(1, vcpus=1)
    qs, ces = env(hosts)
    starts = decide([single("late", 9), single("early", 1)], qs, ces, hosts)
    assert [s.key for s in starts] == ["early"]


def test_higher_priority_queue_first() -> None:
    hosts = cluster(1, vcpus=1)
    qs, ces = env(hosts, low=1, high=10)
    starts = decide([single("a", 1, "low"), single("b", 2, "high")], qs, ces, hosts)
    assert [s.key for s in starts] == ["b"]


def test_multinode_gang_on_distinct_hosts_exclusive() -> None:
    hosts = cluster(4)
    qs, ces = env(hosts)
    starts = decide([mnp_job("m", 1, 4)], qs, ces, hosts)
    assert len(starts) == 1
    assert sorted(g.host for g in starts[0].grants) == ["h0", "h1", "h2", "h3"]
    assert all(h.exclusive for h in hosts.values())


def test_multinode_never_holds_part_of_the_cluster() -> None:
    hosts = cluster(4)
    hosts["h3"].take(R1, False)  # busy
    qs, ces = env(hosts)
    starts = decide([mnp_job("m", 1, 4)], qs, ces, hosts)
    assert starts == []
    assert not any(h.exclusive for h in hosts.values())


def test_blocked_multinode_job_is_not_starved_by_later_small_jobs() -> None:
    hosts = cluster(4)
    hosts["h3"].take(R1, False)  # the last host is busy with one task
    qs, ces = env(hosts)
    smalls = [single(f"s{i}", 10 + i) for i in range(20)]
    starts = decide([mnp_job("big", 1, 4), *smalls], qs, ces, hosts)
    # every host is reserved for the 4-node job: nothing small may start
    assert starts == []


def test_small_jobs_backfill_hosts_a_blocked_job_cannot_use() -> None:
    hosts = cluster(6)
    hosts["h0"].take(R1, False)
    qs, ces = env(hosts)
    starts = decide([mnp_job("big", 1, 4), single("s", 2)], qs, ces, hosts)
    # big fits on h1..h4 right away; s takes the rest
    assert [s.key for s in starts] == ["big", "s"]


def test_backfill_only_on_unreserved_hosts() -> None:
    hosts = cluster(5)
    for h in ("h0", "h1"):
        hosts[h].take(R1, False)
    qs, ces = env(hosts)
    starts = decide([mnp_job("big", 1, 4), single("s", 2)], qs, ces, hosts)
    # big needs 4 idle hosts and has 3: it reserves h2..h4 and the least busy of h0/h1 (h0);
    # the small job may only use what is left
    assert [(s.key, s.grants[0].host) for s in starts] == [("s", "h1")]


def test_gpu_indices_are_handed_out_and_returned() -> None:
    hosts = cluster(1, vcpus=8, gpus=4)
    qs, ces = env(hosts)
    g2 = Resources(vcpus=1, gpus=2)
    starts = decide(
        [single("a", 1, res=g2), single("b", 2, res=g2), single("c", 3, res=g2)], qs, ces, hosts
    )
    assert [s.grants[0].gpus for s in starts] == [(0, 1), (2, 3)]
    hosts["h0"].give(starts[0].grants[0])
    again = decide([single("c", 3, res=g2)], qs, ces, hosts)
    assert again[0].grants[0].gpus == (0, 1)


def test_disabled_compute_environment_takes_nothing() -> None:
    hosts = cluster(2)
    ces = {"ce": ComputeEnvironment("ce", tuple(hosts), state="DISABLED")}
    qs = {"default": Queue("default", 1, ("ce",))}
    assert decide([single("a", 1)], qs, ces, hosts) == []


def test_compute_environments_in_queue_order() -> None:
    hosts = cluster(2)
    ces = {"a": ComputeEnvironment("a", ("h1",)), "b": ComputeEnvironment("b", ("h0",))}
    qs = {"default": Queue("default", 1, ("a", "b"))}
    starts = decide([single("x", 1)], qs, ces, hosts)
    assert (starts[0].ce, starts[0].grants[0].host) == ("a", "h1")


def test_down_hosts_are_skipped() -> None:
    hosts = cluster(2)
    hosts["h0"].up = False
    qs, ces = env(hosts)
    starts = decide([single("x", 1)], qs, ces, hosts)
    assert starts[0].grants[0].host == "h1"


@pytest.mark.parametrize(
    ("req", "ok"),
    [
        (single("a", 1, res=Resources(vcpus=2)), True),
        (single("a", 1, res=Resources(vcpus=3)), False),
        (single("a", 1, res=Resources(vcpus=1, gpus=1)), False),
        (single("a", 1, res=Resources(vcpus=1, memory=9 << 30)), False),
        (mnp_job("m", 1, 3), True),
        (mnp_job("m", 1, 4), False),
    ],
)
def test_could_ever_run(req: Request, ok: bool) -> None:
    hosts = cluster(3)
    qs, ces = env(hosts)
    assert could_ever_run(req, qs["default"], ces, hosts) is ok


def test_ten_thousand_identical_children_cost_one_placement_attempt_when_full() -> None:
    hosts = cluster(4, vcpus=1)
    qs, ces = env(hosts)
    reqs = [single(f"a:{i}", i) for i in range(10_000)]
    starts = decide(reqs, qs, ces, hosts)
    assert len(starts) == 4


def test_skipping_spent_hosts_changes_no_decision(monkeypatch: pytest.MonkeyPatch) -> None:
    """The per-pass cursor past full, held and reserved hosts is only a shortcut: random
    mixes of singles, GPU tasks and gangs on partly busy, partly down hosts are placed
    exactly as by first fit over every host."""
    import random

    import mnp.sched.decide as d

    def scenario(rng: random.Random) -> tuple[list[Request], dict[str, HostCapacity]]:
        hosts = cluster(rng.randint(1, 12), vcpus=rng.choice([1, 2, 4]), gpus=rng.choice([0, 2]))
        for h in hosts.values():
            h.up = rng.random() > 0.1
            for _ in range(rng.randint(0, 2)):
                if h.fits(R1, False):
                    h.take(R1, False)
        reqs = []
        for seq in range(1, rng.randint(1, 60)):
            kind = rng.random()
            if kind < 0.6:
                res = Resources(vcpus=rng.choice([0.5, 1, 2]), gpus=rng.choice([0, 0, 1]))
                reqs.append(single(f"s{seq}", seq, res=res))
            else:
                reqs.append(
                    mnp_job(f"m{seq}", seq, rng.randint(2, 4), exclusive=rng.random() < 0.7)
                )
        return reqs, hosts

    placed = gangs = 0
    for case in range(300):
        reqs, hosts = scenario(random.Random(case))
        qs, ces = env(hosts)
        fast = decide(reqs, qs, ces, hosts)
        reqs, hosts = scenario(random.Random(case))
        with monkeypatch.context() as m:
            m.setattr(d, "_spent", lambda h, reserved: False)
            slow = decide(reqs, qs, ces, hosts)
        assert fast == slow, case
        placed += len(fast)
        gangs += sum(len(s.grants) > 1 for s in fast)
    assert placed > 500 and gangs > 50  # the cases place plenty, gangs included


@pytest.mark.parametrize(
    ("timeout", "where"),
    [
        (None, "h1"),  # no timeout: never on capacity that ends after its time limit
        (3600.0, "h1"),  # does not fit in 1h less the margin
        (3540.0, "h0"),  # fits exactly
        (60.0, "h0"),
    ],
)
def test_time_limited_managed_capacity_takes_only_work_that_fits(
    timeout: float | None, where: str
) -> None:
    hosts = cluster(2)
    spec = ManagedSpec(provider="slurm", max_vcpus=8, time_limit=3600.0)
    ces = {
        "burst": ComputeEnvironment("burst", ("h0",), managed=spec),
        "own": ComputeEnvironment("own", ("h1",)),
    }
    qs = {"default": Queue("default", 1, ("burst", "own"))}
    req = Request("a", "default", 1, (R1,), timeout=timeout)
    starts = decide([req], qs, ces, hosts)
    assert [s.grants[0].host for s in starts] == [where]


def test_drained_hosts_take_nothing_new() -> None:
    hosts = cluster(2)
    hosts["h0"].drained = "maintenance"
    qs, ces = env(hosts)
    starts = decide([single("a", 1), single("b", 2), single("c", 3)], qs, ces, hosts)
    assert {s.grants[0].host for s in starts} == {"h1"}
    hosts["h0"].drained = None
    starts = decide([single("d", 4)], qs, ces, hosts)
    assert [s.grants[0].host for s in starts] == ["h0"]


def test_a_gang_stays_within_one_managed_allocation() -> None:
    hosts = cluster(4)
    for name, group in (("h0", "7"), ("h1", "8"), ("h2", "8"), ("h3", "9")):
        hosts[name].group = group
    qs, ces = env(hosts)
    starts = decide([mnp_job("g", 1, 2)], qs, ces, hosts)
    assert [g.host for g in starts[0].grants] == ["h1", "h2"]  # not h0 + h1
    assert decide([mnp_job("g3", 2, 3)], qs, ces, hosts) == []  # no allocation has 3
