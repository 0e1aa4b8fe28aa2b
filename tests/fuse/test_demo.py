"""``scripts/demo --no-wait``: the quick-start tour runs end to end and cleans up."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from taskfs.fs.mount import mount_entry

ROOT = Path(__file__).resolve().parents[2]


def test_demo_tour(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "TASKFS_DEMO_DIR": str(tmp_path / "demo"),
        "TASKFS_DEMO_MOUNT": str(tmp_path / "tasks"),
    }
    result = subprocess.run(
        [str(ROOT / "scripts" / "demo"), "--no-wait"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )
    out = result.stdout
    assert result.returncode == 0, result.stdout + result.stderr
    for expected in (
        "$ ls tasks/",
        "control",
        "success\nlocal-",
        "SPH solver 1.0: 400 particles, 20 steps",
        "failed\nerror: mesh.stl not found",
        "computation-started",
        "$ timeout 4 tail -n 3 -f",
        "PID USER",
        "killed",
        "No such process",
        '"status": "killed"',
    ):
        assert expected in out, expected
    # tail -f of the running task: its last 3 lines, then new ones as they were printed.
    followed = out.split("$ timeout 4 tail", 1)[1].split("$ ", 1)[0]
    steps = [int(x.split()[2].split("/")[0]) for x in followed.splitlines() if "[sph] step" in x]
    assert len(steps) >= 6 and steps == list(range(steps[0], steps[0] + len(steps))), followed
    assert "Traceback" not in out + result.stderr
    assert mount_entry(tmp_path / "tasks") is None
    assert not (tmp_path / "demo" / "data" / "server.json").exists()
