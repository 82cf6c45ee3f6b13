"""The local transport: the agent as a subprocess of the controller.

It serves the embedded default inventory (virtual nodes on this machine). The
agent is started with ``--parent-death`` so that it, and through it every task,
dies with the controller even when the controller is SIGKILLed.
"""

from __future__ import annotations

import asyncio
import os
import sys

from mnp.errors import TransportError
from mnp.model import HostSpec, Inventory
from mnp.transport.base import MAX_LINE, AgentStream, Transport


class _SubprocessStream(AgentStream):
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        assert proc.stdin is not None and proc.stdout is not None
        self._stdin = proc.stdin
        self._stdout = proc.stdout

    async def readline(self) -> bytes:
        return await self._stdout.readline()

    def write(self, data: bytes) -> None:
        try:
            self._stdin.write(data)
        except (BrokenPipeError, ConnectionResetError, RuntimeError) as e:
            raise TransportError(f"agent pid {self.proc.pid}: {e}") from None

    async def drain(self) -> None:
        try:
            await self._stdin.drain()
        except (BrokenPipeError, ConnectionResetError) as e:
            raise TransportError(f"agent pid {self.proc.pid}: {e}") from None

    async def close(self) -> None:
        if not self._stdin.is_closing():
            self._stdin.close()
        try:
            await asyncio.wait_for(self.proc.wait(), 10)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()


class LocalTransport(Transport):
    name = "local"

    def __init__(self, python: str | None = None) -> None:
        self.python = python or sys.executable

    async def open(self, host: HostSpec, agent_args: list[str]) -> AgentStream:
        # Tasks on local nodes find the Python environment mnp runs from first
        # (python3, mpiexec from the mpich wheel), as if it were activated.
        env = dict(os.environ)
        bindir = os.path.dirname(self.python)
        path = env.get("PATH", "")
        if bindir and bindir not in path.split(os.pathsep):
            env["PATH"] = bindir + (os.pathsep + path if path else "")
        try:
            proc = await asyncio.create_subprocess_exec(
                self.python,
                "-m",
                "mnp.agent",
                "--parent-death",
                *agent_args,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                limit=MAX_LINE,
                env=env,
            )
        except OSError as e:
            raise TransportError(f"{host.name}: cannot start the local agent: {e}") from None
        return _SubprocessStream(proc)


def make(inventory: Inventory) -> LocalTransport:
    return LocalTransport()
