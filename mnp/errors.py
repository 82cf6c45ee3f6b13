"""One exception tree for everything a user can act on.

::

    MnpError                 exit 1 unless a subclass says otherwise
    ├── UsageError           exit 2: bad command-line usage
    ├── SpecError            exit 2: invalid definition or inventory ("file:field: what; allowed")
    ├── JobRefused           exit 2: a valid job the cluster refuses (resources, queue, cycles)
    └── InfraError           exit 3: controller unreachable, no host reachable, agent died
        ├── TransportError   a host's byte stream (local subprocess or SSH) failed
        └── HostKeyError     a host's SSH key is unknown or changed

Library exceptions (OSError, asyncssh.Error, tomllib errors) are converted at
the boundary where they happen; ``mnp.cli.main`` is the one place that turns an
``MnpError`` into ``mnp: <message>`` on stderr and its ``exit_code``.
"""

from __future__ import annotations


class MnpError(Exception):
    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class UsageError(MnpError):
    exit_code = 2


class SpecError(MnpError):
    """A definition or inventory is invalid. ``str()`` is ``file:field: message``."""

    exit_code = 2

    def __init__(self, file: str, field: str, message: str) -> None:
        self.file = file
        self.field = field
        self.detail = message
        where = ":".join(p for p in (file, field) if p)
        super().__init__(f"{where}: {message}" if where else message)


class JobRefused(MnpError):
    exit_code = 2


class InfraError(MnpError):
    exit_code = 3


class TransportError(InfraError):
    pass


class HostKeyError(TransportError):
    pass
