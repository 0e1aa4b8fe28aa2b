"""Runs inside a network namespace of its own (see ``test_official_client_live_channel``): starts
``taskfs serve``, runs tasks, drives the unmodified official client's live commands against
them and prints what each command printed as one JSON document on the last line.

Inside the namespace the only addresses are 127.0.0.1 and 127.0.0.2 on ``lo``: the official
client (which leaves 127.0.0.1 out of its candidates) gathers 127.0.0.2, the service answers
from 127.0.0.1, and nothing can leave the machine.

Usage: python -m tests.integration.official_live_driver INDUCTIVA_BIN_DIR DATA_DIR
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

from taskfs.api.models import TaskStatusCode as S
from tests.support import Service, start_service, stop

WAIT_SCRIPT = textwrap.dedent(
    """
    import sys
    from inductiva.tasks import Task
    print("STATUS " + Task(sys.argv[1]).wait().value, flush=True)
    """
)


def run(cmd: list[str], env: dict[str, str], timeout: float = 60) -> dict[str, Any]:
    started = time.monotonic()
    try:
        done = subprocess.run(
            # In the fresh home: Task.wait() downloads stdout/stderr into ./inductiva_output.
            cmd,
            env=env,
            cwd=env["HOME"],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as exc:
        return {"rc": "timeout", "stdout": str(exc.stdout), "stderr": str(exc.stderr)}
    return {
        "rc": done.returncode,
        "stdout": done.stdout,
        "stderr": done.stderr,
        "seconds": time.monotonic() - started,
    }


def computing(service: Service, *commands: str) -> str:
    task_id = service.submit(*commands)
    service.wait_for(task_id, lambda s: s.status == S.COMPUTATION_STARTED or s.is_terminated)
    return task_id


def main() -> None:
    bin_dir, data_dir = Path(sys.argv[1]), Path(sys.argv[2])
    service = start_service(data_dir, slots=4)
    home = data_dir / "home"
    home.mkdir()
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "HOME": str(home),
        "INDUCTIVA_API_URL": service.url,
        "INDUCTIVA_API_KEY": service.key,
        "INDUCTIVA_DISABLE_ANSI": "true",
    }
    cli = str(bin_dir / "inductiva")
    out: dict[str, Any] = {}
    try:
        steady = computing(
            service,
            "mkdir -p out/deep; echo x > out/deep/field.vtk",
            "seq 1 50; echo warn >&2; sleep 60",
        )
        time.sleep(0.5)
        out["tail"] = run([cli, "tasks", "tail", steady, "stdout.txt", "-l", "3"], env)
        out["tail_two"] = run([cli, "tasks", "tail", steady, "stdout.txt", "stderr.txt"], env)
        out["missing"] = run([cli, "tasks", "tail", steady, "nope.txt"], env)
        out["list_files"] = run([cli, "tasks", "list-files", steady], env)
        out["top"] = run([cli, "tasks", "top", steady], env)
        out["last_modified"] = run([cli, "tasks", "last-modified-file", steady], env)
        service.call(lambda api: api.kill(steady))

        # The first line after 4 s: both clients are attached by then, even on a loaded machine
        # (their start takes 1-3 s; one that attached late showed only the lines after).
        ticking = computing(
            service,
            "sleep 4; for i in $(seq 1 20); do echo step $i; echo err $i >&2; sleep 0.2; done",
        )
        follow = subprocess.Popen(
            [cli, "tasks", "tail", ticking, "stdout.txt", "-f"],
            env=env,
            cwd=home,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        logs = subprocess.Popen(
            [cli, "logs", ticking],
            env=env,
            cwd=home,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, proc in (("follow", follow), ("logs", logs)):
            try:
                stdout, stderr = proc.communicate(timeout=60)
                out[name] = {"rc": proc.returncode, "stdout": stdout, "stderr": stderr}
            except subprocess.TimeoutExpired:
                proc.kill()
                out[name] = {"rc": "timeout", "stdout": "", "stderr": ""}

        waited = service.submit("sleep 1; for i in 1 2 3; do echo wait-line-$i; sleep 0.3; done")
        script = data_dir / "wait.py"
        script.write_text(WAIT_SCRIPT)
        out["wait"] = run([str(bin_dir / "python"), str(script), waited], env)
    finally:
        stop(service.proc)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
