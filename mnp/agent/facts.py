"""What a host offers: the body of the `ready` and `facts` events.

pynvml is imported only on hosts with an NVIDIA driver (/dev/nvidiactl), so the
agent starts without paying for the import anywhere else.
"""

from __future__ import annotations

import os
import stat
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs milliseconds to import; annotations are strings here
    from typing import Any, Dict, List, Optional, Tuple


PROTOCOL_VERSION = 1


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def cpus() -> List[int]:
    """The CPU ids the agent (and so its tasks) may run on: what `cpu_bind = "cores"`
    chooses from."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return list(range(os.cpu_count() or 1))


def _cgroup_memory_limit() -> Optional[int]:
    """memory.max of the agent's cgroup (v2), when it is a number."""
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith("0::"):
            try:
                with open("/sys/fs/cgroup" + line[3:].rstrip("/") + "/memory.max") as f:
                    text = f.read().strip()
            except OSError:
                return None
            return int(text) if text.isdigit() else None
    return None


def memory() -> int:
    """Bytes of memory tasks may use: MemTotal, or the agent's cgroup limit if lower."""
    total = 0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    total = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    if not total:
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError):
            total = 0
    limit = _cgroup_memory_limit()
    return min(total, limit) if limit and total else total


def load() -> Dict[str, Any]:
    """The host's load now, for the `load` event: the 1, 5 and 15-minute load averages
    and the memory in use (bytes, MemTotal - MemAvailable), each None where the host
    cannot say."""
    averages: Optional[List[float]] = None
    try:
        averages = [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        pass
    used = None
    info: Dict[str, int] = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("MemTotal", "MemAvailable"):
                    info[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    if len(info) == 2:
        used = max(0, info["MemTotal"] - info["MemAvailable"])
    return {"load": averages, "memory_used": used}


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def gpus_from(nvml: Any) -> List[Dict[str, Any]]:
    """The GPUs an initialised pynvml module reports, in NVML index order."""
    out: List[Dict[str, Any]] = []
    for index in range(nvml.nvmlDeviceGetCount()):
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        out.append(
            {
                "index": index,
                "name": _text(nvml.nvmlDeviceGetName(handle)),
                "memory": int(nvml.nvmlDeviceGetMemoryInfo(handle).total),
                "uuid": _text(nvml.nvmlDeviceGetUUID(handle)),
            }
        )
    return out


def gpus() -> Tuple[List[Dict[str, Any]], bool]:
    """(GPUs, whether NVML worked). Empty without an NVIDIA driver or without pynvml."""
    if not (os.path.exists("/dev/nvidiactl") or os.path.isdir("/proc/driver/nvidia/gpus")):
        return [], False
    try:
        import pynvml
    except Exception:
        return [], False
    try:
        pynvml.nvmlInit()
    except Exception:
        return [], False
    try:
        return gpus_from(pynvml), True
    except Exception as e:
        sys.stderr.write("mnp agent: NVML: %s\n" % e)
        return [], True
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def has_psutil() -> bool:
    """Whether psutil is importable, without importing it (or importlib.util)."""
    if "psutil" in sys.modules:
        return True
    for entry in sys.path:
        if isinstance(entry, str) and os.path.isfile(
            os.path.join(entry or ".", "psutil", "__init__.py")
        ):
            return True
    return False


def _own_dir(path: str) -> bool:
    """Make `path` (mode 0700) or accept it if it is already ours and private."""
    try:
        os.mkdir(path, 0o700)
        return True
    except FileExistsError:
        pass
    except OSError:
        return False
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o022


def make_rundir(ctl: str) -> str:
    """A private directory for files the controller has the agent write (hostfiles):
    `$TMPDIR/mnp-UID/CTL`, or a fresh sibling if someone else owns that path."""
    base = os.path.join(os.environ.get("TMPDIR") or "/tmp", "mnp-%d" % os.getuid())
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in ctl)[:64].lstrip(".") or "_"
    if not _own_dir(base):
        base = "%s-%s" % (base, os.urandom(4).hex())
        if not _own_dir(base):
            return ""
    path = os.path.join(base, safe)
    return path if _own_dir(path) else ""


def collect(started: float, rundir: str = "") -> Dict[str, Any]:
    gpu_list, nvml = gpus()
    return {
        "hostname": os.uname().nodename,
        "python": "%d.%d.%d" % sys.version_info[:3],
        "pid": os.getpid(),
        "cores": cores(),
        "cpus": cpus(),
        "memory": memory(),
        "gpus": gpu_list,
        "started": started,
        "version": PROTOCOL_VERSION,
        "psutil": has_psutil(),
        "nvml": nvml,
        "rundir": rundir,
    }
