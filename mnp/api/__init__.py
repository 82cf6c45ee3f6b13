"""The control socket: JSON lines over ``$home/controller.sock`` (0600, peer uid checked).

Protocol: one JSON object per line, UTF-8, at most ``MAX_LINE`` bytes a line.

- A request is ``{"op": "NAME", "id": ANY, ...fields}``; ``id`` is optional but
  needed to tell responses apart when several requests share a connection.
- Each request gets one or more responses carrying its ``id``; the last one has
  ``"end": true``. Every response has ``"ok"``; an error is
  ``{"ok": false, "error": "...", "exit_code": N, "end": true}`` (``N`` as in
  ``mnp.errors``). An error without ``id`` concerns the whole connection (a
  malformed line, or a peer that is not the controller's owner).
- A client that closes (or half-closes) its end is gone: the server stops
  writing to it, and handlers see ``Responder.closed``.

Two rooms:

- ``mnp.api.client``: ``ApiClient`` (blocking, standard library only) and the wire
  format both sides share. The CLI imports it alone, on every command.
- ``mnp.api.server``: ``ApiServer`` and ``Responder`` (asyncio), for the daemon.

Every name is importable from ``mnp.api`` as well; the server's are loaded on first
use, so ``import mnp.api`` costs no more than the client.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mnp.api.client import MAX_LINE, SOCKET_NAME, ApiClient, error_from_response, socket_path

if TYPE_CHECKING:
    from mnp.api.server import MAX_IN_FLIGHT, ApiServer, Handler, Responder

_SERVER_NAMES = frozenset({"MAX_IN_FLIGHT", "ApiServer", "Handler", "Responder"})


def __getattr__(name: str) -> object:
    """The server's names, imported when first asked for (PEP 562)."""
    if name in _SERVER_NAMES:
        from mnp.api import server

        value = getattr(server, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "MAX_IN_FLIGHT",
    "MAX_LINE",
    "SOCKET_NAME",
    "ApiClient",
    "ApiServer",
    "Handler",
    "Responder",
    "error_from_response",
    "socket_path",
]
