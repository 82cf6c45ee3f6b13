"""``mnp plot`` writes real PNGs that a test opens (issue 17); without matplotlib it
says so in one line."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import matplotlib.image
import pytest

from tests.helpers import mnp as mnp_cli


@pytest.fixture
def env(tmp_path: Path) -> Iterator[dict[str, str]]:
    yield {"MNP_HOME": str(tmp_path / "home")}


def opened(path: Path) -> tuple[int, int, int]:
    """Width, height and how many distinct colours the PNG at ``path`` has."""
    pixels = matplotlib.image.imread(path)
    flat = {tuple(p) for row in pixels[::4] for p in row[::4]}
    return pixels.shape[1], pixels.shape[0], len(flat)


def has_colour(path: Path, rgb: tuple[int, int, int]) -> bool:
    pixels = (matplotlib.image.imread(path)[..., :3] * 255).round().astype(int)
    return bool(((abs(pixels - rgb) <= 2).all(axis=-1)).any())


def test_timelines_and_cluster_usage(env: dict[str, str], tmp_path: Path) -> None:
    run = [
        "run",
        "--array-size",
        "4",
        "--",
        "sh",
        "-c",
        "sleep 0.2; exit $((MNP_ARRAY_INDEX == 2))",
    ]
    assert mnp_cli(*run, env=env).returncode == 1  # child 2 fails
    assert mnp_cli("run", "--nodes", "3", "--", "sleep", "0.3", env=env).returncode == 0
    array_png, nodes_png = tmp_path / "array.png", tmp_path / "nodes.png"
    r = mnp_cli("plot", "1", "-o", str(array_png), env=env)
    assert r.returncode == 0 and r.stdout == f"{array_png}\n", r.stderr
    width, height, colours = opened(array_png)
    assert (width, height) == (1000, 270) and colours > 10  # four rows
    assert has_colour(array_png, (0x2E, 0x7D, 0x32)) and has_colour(array_png, (0xC6, 0x28, 0x28))
    assert mnp_cli("plot", "2", "-o", str(nodes_png), env=env).returncode == 0
    assert opened(nodes_png)[:2] == (1000, 250)  # three rows, one per node
    assert has_colour(nodes_png, (0x2E, 0x7D, 0x32)) and not has_colour(
        nodes_png, (0xC6, 0x28, 0x28)
    )
    for by in ("host", "queue"):
        png = tmp_path / f"cluster-{by}.png"
        r = mnp_cli("plot", "--since", "1h", "--by", by, "-o", str(png), env=env)
        assert r.returncode == 0, r.stderr
        width, height, colours = opened(png)
        assert (width, height) == (1000, 400) and colours > 10
        assert has_colour(png, (0x1F, 0x77, 0xB4))  # the first band is drawn


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["plot", "-o", "x.png"], "mnp: give a JOB (its timeline) or --since DURATION"),
        (["plot", "1", "--since", "1h", "-o", "x.png"], "mnp: give a JOB (its timeline)"),
        (["plot", "--since", "soon", "-o", "x.png"], "mnp: --since 'soon': "),
        (["plot", "99", "-o", "x.png"], "mnp: job 99 does not exist"),
    ],
)
def test_bad_plot_requests(env: dict[str, str], args: list[str], message: str) -> None:
    r = mnp_cli(*args, env=env)
    assert r.returncode == 2 and r.stderr.startswith(message) and r.stderr.count("\n") == 1


def test_without_matplotlib_one_line(env: dict[str, str], tmp_path: Path) -> None:
    hidden = tmp_path / "hide"
    (hidden / "matplotlib").mkdir(parents=True)
    (hidden / "matplotlib" / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
    assert mnp_cli("run", "--", "true", env=env).returncode == 0
    r = mnp_cli("plot", "1", "-o", str(tmp_path / "x.png"), env={**env, "PYTHONPATH": str(hidden)})
    assert r.returncode == 3
    assert r.stderr == (
        "mnp: mnp plot needs matplotlib, which is not installed: pip install 'mnp[plot]'\n"
    )
    assert not (tmp_path / "x.png").exists()
