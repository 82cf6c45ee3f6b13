"""The command provider's contract (mnp/provider/command.py) with real programs: what
start prints, what stop receives, failures, backoff, time limits."""

from __future__ import annotations

from pathlib import Path

import pytest

from mnp.provider.command import CommandProvider, parse_hosts
from mnp.provider.slurm import ProviderError


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def sh(script: str) -> tuple[str, ...]:
    return ("sh", "-c", script, "prog")


def provider(tmp: Path, start: str, stop: str = "", **kw: object) -> CommandProvider:
    stop = stop or f'echo "$MNP_ALLOCATION $*" >> {tmp}/stops'
    return CommandProvider("cloud", sh(start), sh(stop), **kw)  # type: ignore[arg-type]


UP = 'i=0; while [ $i -lt "$MNP_NODES" ]; do i=$((i+1)); echo "vm-$i 10.0.0.$i"; done'


def test_parse_hosts() -> None:
    assert parse_hosts("a\nb 10.0.0.2\n\n", 2) == {"a": "a", "b": "10.0.0.2"}
    for text, said in [
        ("a\n", "printed 1 hosts, asked for 2"),
        ("a\na\n", "host 'a' printed twice"),
        ("a b c\nd\n", "is not NAME or NAME ADDRESS"),
    ]:
        with pytest.raises(ValueError, match=said):
            parse_hosts(text, 2)


async def test_start_poll_stop(tmp_path: Path) -> None:
    p = provider(tmp_path, UP)
    alloc = await p.submit(2, None)
    assert alloc.startswith("cmd-cloud-")
    st = await p.poll([alloc, "other"])
    assert st[alloc].phase == "RUNNING" and st[alloc].nodes == ("vm-1", "vm-2")
    assert st[alloc].time_left is None  # no time_limit: none
    assert st["other"].state == "GONE"
    assert p.addresses == {"vm-1": "10.0.0.1", "vm-2": "10.0.0.2"}
    await p.cancel(alloc)
    assert (tmp_path / "stops").read_text() == f"{alloc} vm-1 vm-2\n"
    st = await p.poll([alloc])
    assert (st[alloc].state, st[alloc].phase) == ("STOPPED", "ENDED")
    await p.cancel(alloc)  # once stopped, stop is not run again
    assert (tmp_path / "stops").read_text().count("\n") == 1


async def test_failed_start_backs_off(tmp_path: Path) -> None:
    clock = Clock()
    p = provider(tmp_path, f'echo try >> {tmp_path}/tries; echo vm-1; echo quota >&2; exit 3',
                 clock=clock)  # fmt: skip
    with pytest.raises(ProviderError, match="start failed: sh: quota"):
        await p.submit(1, None)
    with pytest.raises(ProviderError, match="start failed: sh: quota"):
        await p.submit(1, None)  # within the backoff: not run again
    assert (tmp_path / "tries").read_text() == "try\n"
    clock.now += 5.1
    with pytest.raises(ProviderError):
        await p.submit(1, None)
    clock.now += 5.1  # the second wait is 10 s
    with pytest.raises(ProviderError):
        await p.submit(1, None)
    assert (tmp_path / "tries").read_text() == "try\ntry\n"


async def test_wrong_count_and_timeout_are_errors(tmp_path: Path) -> None:
    p = provider(tmp_path, "echo vm-1")
    with pytest.raises(ProviderError, match="printed 1 hosts, asked for 2"):
        await p.submit(2, None)
    p = provider(tmp_path, "sleep 5", start_timeout=0.3)
    with pytest.raises(ProviderError, match="gave no answer within 0.3s"):
        await p.submit(1, None)
    p = CommandProvider("cloud", ["/nonexistent/up"], ["true"])
    with pytest.raises(ProviderError, match="cannot run /nonexistent/up"):
        await p.submit(1, None)


async def test_time_limit_stops_the_allocation(tmp_path: Path) -> None:
    clock = Clock()
    p = provider(tmp_path, UP, time_limit=3600.0, clock=clock)
    alloc = await p.submit(1, 3600.0)
    clock.now += 600
    assert (await p.poll([alloc]))[alloc].time_left == 3000.0
    clock.now += 3000
    st = (await p.poll([alloc]))[alloc]
    assert (st.state, st.phase) == ("TIMEOUT", "ENDED")
    assert (tmp_path / "stops").read_text() == f"{alloc} vm-1\n"


async def test_failed_stop_is_retried_at_the_next_poll(tmp_path: Path) -> None:
    flag = tmp_path / "ok"
    p = provider(tmp_path, UP, f"test -e {flag} || {{ echo api down >&2; exit 1; }}")
    alloc = await p.submit(1, None)
    with pytest.raises(ProviderError, match=f"stop of {alloc} failed: sh: api down"):
        await p.cancel(alloc)
    with pytest.raises(ProviderError):
        await p.poll([alloc])
    flag.touch()
    assert (await p.poll([alloc]))[alloc].state == "STOPPED"
