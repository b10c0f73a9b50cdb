"""An interrupted ``make sweep`` leaves docs/performance.md as it was.

The sweep writes its tables into the document only at its end; a run stopped by
SIGINT (Ctrl-C) or SIGTERM has measured part of the ladder at most, and its
tables must not replace the recorded ones.  The test starts the real sweep
(etcd, a node, SIPp) on a copy of the document, interrupts it once the first
workload begins, and checks the exit code, the message and the document.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

DOCUMENT = """# Performance

<!-- sweep tables: begin (written by make sweep) -->
the recorded tables
<!-- sweep tables: end -->
"""


def test_interrupted_sweep_keeps_the_recorded_tables(tmp_path: Path) -> None:
    document = tmp_path / "performance.md"
    document.write_text(DOCUMENT)
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "loadtest.sweep",
            "--target",
            "sipcluster",
            "--workloads",
            "register",
            "--rates",
            "register=200",
            "--step-seconds",
            "20",
            "--output",
            str(tmp_path / "run"),
            "--write-docs",
            str(document),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    lines = []
    try:
        for line in process.stdout:
            lines.append(line)
            if line.startswith("== sipcluster: register"):
                process.send_signal(signal.SIGINT)
                break
        rest, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    output = "".join(lines) + rest
    assert process.returncode == 130, output
    assert "left as it was" in output, output
    assert document.read_text() == DOCUMENT
