"""Reading an op's fields: each check says what is wrong (`BadRequest`), and the agent
answers with `{"ev": "error"}` instead of acting on it."""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs milliseconds to import; annotations are strings here
    from typing import Any, Dict, List, Tuple


class BadRequest(Exception):
    pass


def index_list(text: str) -> List[int]:
    """`"0,3"` as [0, 3]: the CPU or GPU indices of `MNP_CPUS` / `CUDA_VISIBLE_DEVICES`;
    [] for "" or anything that is not a list of indices (ranges, GPU UUIDs)."""
    out: List[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part.isdigit():
            return []
        out.append(int(part))
    return out


def tid_of(msg: Dict[str, Any]) -> str:
    tid = msg.get("tid")
    if not isinstance(tid, str) or not tid or "\0" in tid:
        raise BadRequest("tid must be a non-empty string")
    return tid


def optional(msg: Dict[str, Any], key: str, kind: type) -> Any:
    value = msg.get(key)
    if value is not None and not isinstance(value, kind):
        raise BadRequest("%s must be %s or null" % (key, kind.__name__))
    return value


def grace_of(msg: Dict[str, Any], default: float) -> float:
    grace = msg.get("grace")
    if grace is None:
        return default
    if isinstance(grace, bool) or not isinstance(grace, (int, float)) or not grace >= 0:
        raise BadRequest("grace must be a number of seconds >= 0")
    return float(grace)


def files_of(msg: Dict[str, Any]) -> List[Tuple[str, str]]:
    files = msg.get("files")
    if files is None:
        return []
    out: List[Tuple[str, str]] = []
    if isinstance(files, list):
        for f in files:
            if not isinstance(f, dict):
                break
            path, data = f.get("path"), f.get("data")
            if not (isinstance(path, str) and path.startswith("/") and "\0" not in path):
                break
            if not isinstance(data, str):
                break
            out.append((path, data))
        else:
            return out
    raise BadRequest("files must be a list of {path (absolute), data (str)}")


def env_entry(key: Any, value: Any) -> bool:
    return (
        isinstance(key, str)
        and bool(key)
        and "=" not in key
        and "\0" not in key
        and (value is None or (isinstance(value, str) and "\0" not in value))
    )
