"""The README's first command, as a new user runs it (smaller, to stay quick)."""

from __future__ import annotations

import re
import subprocess
import sys


def test_demo_prints_the_table_and_every_identity_gets_its_role() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "daemon", "demo", "--pods", "24", "--identities", "3", "--concurrency", "8"],
        capture_output=True, text=True, timeout=180,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert re.search(r"pods\s+24 \(0 failed\)", out)
    assert re.search(r"STS exchanges\s+3\n", out)
    assert re.search(r"cache hit ratio\s+\d+\.\d%", out)
    assert re.search(r"time to credentials p99\s+\d+\.\d ms", out)
    rows = re.findall(r"team-(\d):app\s+(\d+)\s+team-\1-app\s+team-\1-app x\2\s+yes", out)
    assert len(rows) == 3, out
