"""Compact JSON (``separators=(",", ":")``, ASCII), made cheap for the hot paths of
the controller (every event and agent message) and of the agent (every event it
reports): one line a message, encoded once.

``json.JSONEncoder.encode`` builds a new C encoder object at each call; the one made
here is built once and reused (without the circular-reference check: what is
encoded are plain dicts, lists and scalars the caller built itself). Where the C
accelerator is missing, the standard encoder does the same job.
"""

from __future__ import annotations

import json
from json import encoder as _encoder

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs milliseconds to import; annotations are strings here
    from typing import Any, Callable


def _default(o: Any) -> Any:
    raise TypeError(f"Object of type {type(o).__name__} is not JSON serializable")


def _compact() -> Callable[[Any], str]:
    standard = json.JSONEncoder(separators=(",", ":")).encode
    make = getattr(_encoder, "c_make_encoder", None)
    if make is None:
        return standard
    try:
        chunks = make(None, _default, _encoder.encode_basestring_ascii, None, ":", ",",
                      False, False, True)  # fmt: skip
    except TypeError:  # another signature than CPython 3.8-3.13's
        return standard

    def encode(o: Any) -> str:
        if isinstance(o, dict):
            return "".join(chunks(o, 0))
        return standard(o)

    if encode({"a": [1, 2.5, None, True, "\u00e9\udc80"]}) != standard(
        {"a": [1, 2.5, None, True, "\u00e9\udc80"]}
    ):
        return standard
    return encode


dumps = _compact()
"""``json.dumps(o, separators=(",", ":"))``, for plain data the caller built."""
