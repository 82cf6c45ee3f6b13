"""Build a tiny container image from this host's own binaries, without a registry.

    python3 examples/container_image.py localhost/mnp-hello:main [localhost/mnp-hello:worker ...]

Each image holds a shell and a few tools (``sh cat env hostname sleep true ls id
tr``), the libraries ``ldd`` says they need, and ``/etc/mnp-image`` naming the image,
assembled into a root filesystem and loaded with ``podman import`` (or ``docker
import`` with ``--runtime docker``). ``nodegroups/container-hello.toml`` runs in
these; the tests and ``benchmarks/`` build them the same way. Takes well under a
second per image.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

TOOLS = ("sh", "cat", "env", "hostname", "sleep", "true", "ls", "id", "tr")
_LIB = re.compile(r"(/\S+) \(0x")


def _libraries(binary: str) -> set[str]:
    out = subprocess.run(["ldd", binary], capture_output=True, text=True, check=False).stdout
    return set(_LIB.findall(out))


def rootfs(dest: Path, name: str) -> None:
    """Lay out the root filesystem of image ``name`` under ``dest``."""
    files: set[str] = set()
    for tool in TOOLS:
        path = shutil.which(tool)
        if path is None:
            raise SystemExit(f"container_image: {tool} not found on PATH")
        files.add(path)
        files |= _libraries(path)
    for f in sorted(files):
        target = dest / f.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(os.path.realpath(f), target)
    for tool in TOOLS:  # also under /bin and /usr/bin, whatever the host's layout
        src = Path(shutil.which(tool) or "")
        for folder in ("bin", "usr/bin"):
            link = dest / folder / tool
            if not link.exists():
                link.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(os.path.realpath(src), link)
    for folder in ("etc", "tmp", "proc", "sys", "dev", "run"):
        (dest / folder).mkdir(exist_ok=True)
    (dest / "tmp").chmod(0o1777)
    (dest / "etc" / "mnp-image").write_text(name + "\n")


def build(name: str, runtime: str = "podman") -> None:
    """Build image ``name`` with ``runtime`` (podman or docker) ``import``."""
    with tempfile.TemporaryDirectory(prefix="mnp-image-") as tmp:
        root = Path(tmp) / "root"
        root.mkdir()
        rootfs(root, name)
        tar = Path(tmp) / "root.tar"
        with tarfile.open(tar, "w") as t:
            t.add(root, arcname=".")
        subprocess.run(
            [runtime, "import", str(tar), name], check=True, capture_output=True, text=True
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("names", nargs="+", metavar="NAME:TAG")
    p.add_argument("--runtime", default="podman", choices=("podman", "docker"))
    args = p.parse_args(argv)
    for name in args.names:
        build(name, args.runtime)
        print(name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
