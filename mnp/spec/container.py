"""``[container]`` and a node group's ``container = {...}``: the image a task runs in.

``image`` is required; ``runtime`` is ``auto`` (the first of podman, docker,
apptainer found on the node), ``podman``, ``docker`` or ``apptainer``; ``mounts``
are ``"HOST:CONTAINER[:ro]"`` with absolute paths (AWS Batch volumes and mount
points); ``options`` are extra runtime arguments, put before the image.
"""

from __future__ import annotations

import re
from typing import Any

from mnp.model import CONTAINER_RUNTIMES, Container, Mount
from mnp.spec.fields import Table, check_string, fail, index_path, show

CONTAINER_FIELDS = ("image", "runtime", "mounts", "options")
MAX_MOUNTS = 64
MAX_OPTIONS = 64
MOUNT_RULE = 'use "HOST:CONTAINER" or "HOST:CONTAINER:ro", both absolute paths'
# a reference as podman/docker/apptainer take it: no spaces, no leading "-"
_IMAGE_RE = re.compile(r"[A-Za-z0-9_./:@+-]{1,512}")
_IMAGE_RULE = (
    'use an image reference such as "docker.io/library/python:3.12", '
    '"localhost/train:v1" or an apptainer file "/images/train.sif"'
)


def parse_container(source: str, field: str, value: object) -> Container:
    """The ``container`` table at ``field`` of ``source``; SpecError on any problem."""
    t = Table(source, field, value, CONTAINER_FIELDS, what="a table { image = ..., ... }")
    if "image" not in t:
        t.fail("image", f"missing; {_IMAGE_RULE}")
    image = t.string("image", "")
    if not _IMAGE_RE.fullmatch(image) or image.startswith("-"):
        t.fail("image", f"{show(image)} is not an image reference; {_IMAGE_RULE}")
    runtime = t.choice("runtime", "auto", CONTAINER_RUNTIMES)
    mounts = tuple(
        parse_mount(source, index_path(t.field("mounts"), i), spec)
        for i, spec in enumerate(t.strings("mounts") or ())
    )
    if len(mounts) > MAX_MOUNTS:
        t.fail("mounts", f"{len(mounts)} mounts; allowed at most {MAX_MOUNTS}")
    options = t.strings("options") or ()
    if len(options) > MAX_OPTIONS:
        t.fail("options", f"{len(options)} options; allowed at most {MAX_OPTIONS}")
    for i, opt in enumerate(options):
        if not opt:
            fail(source, index_path(t.field("options"), i), "empty; give a runtime argument")
    return Container(image=image, runtime=runtime, mounts=mounts, options=tuple(options))


def parse_mount(source: str, field: str, spec: object) -> Mount:
    """``"HOST:CONTAINER[:ro]"`` (absolute paths) → Mount."""
    text = check_string(source, field, spec)
    parts = text.split(":")
    read_only = False
    if len(parts) == 3 and parts[2] in ("ro", "rw"):
        read_only = parts.pop() == "ro"
    if len(parts) != 2:
        fail(source, field, f"{show(text)} is not a mount; {MOUNT_RULE}")
    host, inside = parts
    for what, path in (("host", host), ("container", inside)):
        if not path.startswith("/"):
            fail(
                source,
                field,
                f"{show(text)}: the {what} path {show(path)} is not absolute; {MOUNT_RULE}",
            )
        if "," in path:
            fail(source, field, f"{show(text)}: a path may not hold a comma; {MOUNT_RULE}")
    return Mount(host=host, container=inside, read_only=read_only)


def container_to_dict(c: Container) -> dict[str, Any]:
    """``c`` as the TOML-shaped table :func:`parse_container` reads back."""
    return {
        "image": c.image,
        "runtime": c.runtime,
        "mounts": [m.spec() for m in c.mounts],
        "options": list(c.options),
    }
