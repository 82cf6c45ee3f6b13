"""mnp: AWS Batch's job model (single, array and multi-node parallel jobs) on
any set of machines reachable over SSH, or on this machine alone.

``mnp.Client`` is the Python API (``mnp.pyapi``), imported on first use so that
``import mnp`` stays cheap."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mnp import errors  # the API's errors, cheap: MnpError and its subclasses

__version__ = "0.1.0"
__all__ = ["Client", "__version__", "errors"]

if TYPE_CHECKING:
    from mnp.pyapi import Client


def __getattr__(name: str) -> Any:
    if name == "Client":
        from mnp.pyapi import Client

        return Client
    raise AttributeError(f"module 'mnp' has no attribute {name!r}")
