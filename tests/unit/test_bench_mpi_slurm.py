"""benchmarks/mpi_slurm.py without Slurm: the relay that counts a rank's PMI lines and
bytes, and the table it renders (the benchmark itself needs minutes; not a test)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from benchmarks.mpi_slurm import table

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "mpi_slurm.py"

RANK = """
import os, socket
s = socket.socket(fileno=int(os.environ["PMI_FD"]))
f = s.makefile("rwb", buffering=0)
for cmd in (b"cmd=init pmi_version=1 pmi_subversion=1\\n", b"cmd=finalize\\n"):
    f.write(cmd)
    print("rank got", f.readline().decode().strip(), flush=True)
"""

ANSWERS = [b"cmd=response_to_init rc=0 pmi_version=1 pmi_subversion=1\n", b"cmd=finalize_ack\n"]


def test_relay_counts_lines_and_bytes_each_way() -> None:
    server, rank_end = socket.socketpair()
    env = dict(os.environ, PMI_FD=str(rank_end.fileno()), PMI_RANK="3")
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--relay", "--", sys.executable, "-c", RANK],
        env=env,
        pass_fds=[rank_end.fileno()],
        stdout=subprocess.PIPE,
        text=True,
    )
    rank_end.close()
    got = server.makefile("rwb", buffering=0)
    received = []
    for answer in ANSWERS:
        received.append(got.readline())
        got.write(answer)
    out, _ = proc.communicate(timeout=30)
    server.close()
    assert proc.returncode == 0, out
    assert received == [b"cmd=init pmi_version=1 pmi_subversion=1\n", b"cmd=finalize\n"]
    assert "rank got cmd=finalize_ack" in out, out
    sent = sum(map(len, received))
    answered = sum(map(len, ANSWERS))
    assert f"pmi 3 2 {sent} 2 {answered}" in out.splitlines(), out


def test_table_has_medians_and_pmi_counts() -> None:
    results = {
        "reps": 3,
        "shapes": {
            "4x2": {
                "samples": {
                    "srun --mpi=pmi2": {
                        "wall": [1.0, 1.2, 3.0],
                        "to_init": [0.5, 0.6, 0.7],
                        "in_init": [0.1, 0.2, 0.3],
                    }
                },
                "pmi": {"srun --mpi=pmi2": [[30, 3000, 30, 8000], [40, 4000, 40, 9000]] * 2},
            }
        },
    }
    row = table(results).splitlines()[-1]
    assert row == (
        "| 4 × 2 | srun --mpi=pmi2 | 1200 ms (1000-3000) | 600 ms (500-700) "
        "| 200 ms (100-300) | 35 (30-40); 35 (30-40) "
        "| 3500 B (3000-4000); 8500 B (8000-9000) |"
    )
