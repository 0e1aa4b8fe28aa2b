"""scripts/stress: everything at once for a few minutes, on loopback only, bounded in time.

Two mounts run side by side:

* the embedded local service, where tasks are submitted, waited for, killed through
  ``control`` (sometimes eight shells at once), listed while they come and go, and their
  outputs copied and compared with the archives; the service is restarted every 60 seconds
  (on a new port: the mount has to follow it) and a third mount of it is SIGKILLed, recovered
  with ``taskfs unmount`` and mounted again every 30 seconds;
* a task service that is not ours (the test suite's fake, over real HTTP) whose storage fails
  10% of the requests (503, resets, truncated bodies) and which goes dark for a few seconds
  every 40 seconds, while readers copy and randomly read its outputs and compare every byte
  (without a disk cache, and with the kernel's page cache dropped every 10 seconds when run
  as root, so that reads keep going back to storage).

Reported: operations done by kind, errors by kind (the errno the tools saw), wrong bytes (must
be zero), and the resident memory of each mount process over time.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from taskfs.api.models import TaskStatusCode as S  # noqa: E402
from taskfs.fs.mount import mount_entry  # noqa: E402
from tests.fakeapi import FakeApi  # noqa: E402
from tests.fuse.conftest import mount_other, start_mount, stop_mount  # noqa: E402
from tests.rangeserver import Answer, Seen, serve_answerer  # noqa: E402
from tests.support import Service, start_service, stop, taskfs_cmd  # noqa: E402

ERRNO_WORDS = {
    "Input/output error": "EIO",
    "No such process": "ESRCH",
    "Invalid argument": "EINVAL",
    "No such file or directory": "ENOENT",
    "Stale file handle": "ESTALE",
    "Resource temporarily unavailable": "EAGAIN",
    "Read-only file system": "EROFS",
    "Transport endpoint is not connected": "ENOTCONN (mount died!)",
}


class Tally:
    def __init__(self) -> None:
        self.ops: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.wrong_bytes = 0
        self.lock = threading.Lock()

    def ok(self, kind: str) -> None:
        with self.lock:
            self.ops[kind] += 1

    def error(self, kind: str, stderr: str, word: str | None = None) -> None:
        word = word or next((e for text, e in ERRNO_WORDS.items() if text in stderr), "other")
        with self.lock:
            self.ops[kind] += 1
            self.errors[f"{kind}: {word}"] += 1

    def wrong(self, what: str) -> None:
        with self.lock:
            self.wrong_bytes += 1
            self.errors[f"WRONG BYTES: {what}"] += 1


def sh(command: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            ["bash", "-c", command], capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(command, 124, "", "timed out (hung!)")


def loop(until: float, fn: Callable[[], None], pause: float = 0.0) -> None:
    while time.monotonic() < until:
        try:
            fn()
        except Exception as exc:  # a stress run reports, it does not stop
            print(f"worker error: {exc!r}", file=sys.stderr)
        time.sleep(pause)


def cloud_archive(rng: random.Random) -> tuple[bytes, dict[str, bytes]]:
    files = {
        f"series{i % 4}/frame_{i:03d}.vtk": (f"{i} 0.5 1.5\n" * rng.randint(50, 4000)).encode()
        for i in range(150)
    }
    files["raw/stored.bin"] = rng.randbytes(40 << 20)  # more than the memory cache holds
    files["raw/deflated.txt"] = b"".join(b"%d %d\n" % (i, i * i) for i in range(300_000))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(zipfile.ZipInfo("artifacts/"), b"")
        for name, data in files.items():
            method = zipfile.ZIP_STORED if name.endswith(".bin") else zipfile.ZIP_DEFLATED
            zf.writestr(f"artifacts/{name}", data, method)
    return buf.getvalue(), files


def main() -> int:
    parser = argparse.ArgumentParser(prog="scripts/stress", description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args()
    rng = random.Random(2026)
    work = Path(tempfile.mkdtemp(prefix="taskfs-stress-"))
    tally = Tally()
    memory: dict[str, list[tuple[float, float]]] = {"local mount": [], "cloud mount": []}
    started = time.monotonic()
    until = started + args.minutes * 60

    current: list[Service] = [start_service(work / "data", slots=2)]
    fake = FakeApi()
    data, files = cloud_archive(rng)
    fake.add("cloudtask", S.SUCCESS, archive=data)
    fake.add("cloudlive", S.COMPUTATION_STARTED)
    dark = threading.Event()
    fault_rng = random.Random(7)
    fault_lock = threading.Lock()

    def storage_fault(seen: Seen, answer: Answer) -> Answer | None:
        if dark.is_set():
            return Answer(503, {"retry-after": "1"}, b"down")
        with fault_lock:
            if seen.method != "GET" or answer.status != 206 or fault_rng.random() >= 0.10:
                return None
            kind = fault_rng.randrange(3)
        if kind == 0:
            return Answer(503, {"retry-after": "0"}, b"busy")
        if kind == 1:
            return Answer(206, answer.headers, answer.body, cut_after=len(answer.body) // 2)
        short = answer.body[: len(answer.body) // 3]
        return Answer(206, {**answer.headers, "content-length": str(len(short))}, short)

    fake.objects.fault = storage_fault
    fake.api_fault = lambda method, path: (
        Answer(200, {}, b"", delay=3600) if dark.is_set() else None
    )
    local = cloud = victim = None
    with serve_answerer(fake) as url:
        fake.base_url = url
        try:
            local = start_mount(current[0], work / "local", work / "cache-local")
            # No disk cache: every copy goes back to the flaky storage.
            cloud = mount_other(work, url, "--deadline", "3", "--cache-size", "0", name="cloud")
            victim = start_mount(current[0], work / "victim", work / "cache-victim")
            lm, cm = local.path, cloud.path
            tasks: list[str] = []
            tasks_lock = threading.Lock()

            def submit() -> None:
                command = rng.choice(
                    ["echo ok", "seq 1 20000 > n.txt", "exit 3", "sleep 20", "sleep 2; echo slow"]
                )
                try:
                    task_id = current[0].submit(command)
                except Exception as exc:  # the service may be restarting right now
                    tally.error("submit", str(exc), type(exc).__name__)
                    return
                with tasks_lock:
                    tasks.append(task_id)
                tally.ok("submit")
                if command.startswith("sleep 20"):
                    time.sleep(1)
                    shells = rng.choice([1, 8])
                    results = [sh(f"echo kill > {lm}/{task_id}/control") for _ in range(shells)]
                    if not any(r.returncode == 0 for r in results):
                        tally.error("kill", results[0].stderr)
                    else:
                        tally.ok("kill")

            def watch() -> None:
                with tasks_lock:
                    if not tasks:
                        return
                    task_id = rng.choice(tasks)
                for name in ("status", "computation_time", "machine_type"):
                    result = sh(f"cat {lm}/{task_id}/{name}")
                    (
                        tally.ok
                        if result.returncode == 0
                        else lambda k, r=result: tally.error(k, r.stderr)
                    )(f"cat {name}")
                waited = sh(f"timeout 5 cat {lm}/{task_id}/wait", timeout=30)
                if waited.returncode in (0, 124):
                    tally.ok("cat wait")
                else:
                    tally.error("cat wait", waited.stderr)

            def listing() -> None:
                result = sh(f"ls {lm}")
                names = result.stdout.split()
                if result.returncode != 0:
                    tally.error("ls root", result.stderr)
                elif len(names) != len(set(names)):
                    tally.wrong("duplicate names in ls")
                else:
                    tally.ok("ls root")

            def copy_local() -> None:
                with tasks_lock:
                    candidates = list(tasks)
                for task_id in rng.sample(candidates, min(3, len(candidates))):
                    status = sh(f"cat {lm}/{task_id}/status").stdout.strip()
                    if status not in ("success", "failed", "killed"):
                        continue
                    target = work / f"copy-{task_id}"
                    result = sh(f"cp -r {lm}/{task_id}/outputs {target}", timeout=120)
                    if result.returncode != 0:
                        tally.error("cp -r local", result.stderr)
                    elif (target / "n.txt").exists() and (
                        target / "n.txt"
                    ).read_bytes() != b"".join(f"{i}\n".encode() for i in range(1, 20001)):
                        tally.wrong(f"{task_id}/n.txt")
                    else:
                        tally.ok("cp -r local")
                    shutil.rmtree(target, ignore_errors=True)

            def copy_cloud() -> None:
                target = work / f"cloud-copy-{threading.get_ident()}"
                result = sh(f"cp -r {cm}/cloudtask/outputs {target}", timeout=180)
                if result.returncode != 0:
                    tally.error("cp -r cloud", result.stderr)
                else:
                    bad = [n for n, body in files.items() if (target / n).read_bytes() != body]
                    for name in bad:
                        tally.wrong(f"cloud {name}")
                    if not bad:
                        tally.ok("cp -r cloud")
                shutil.rmtree(target, ignore_errors=True)
                live = sh(f"cat {cm}/cloudlive/status")
                if live.returncode != 0:
                    tally.error("cat status cloud", live.stderr)
                elif live.stdout != "computation-started\n":
                    tally.wrong(f"cloud status {live.stdout!r}")
                else:
                    tally.ok("cat status cloud")

            def random_reads() -> None:
                name = rng.choice(["raw/stored.bin", "raw/deflated.txt", "series1/frame_001.vtk"])
                body = files[name]
                try:
                    with open(cm / "cloudtask" / "outputs" / name, "rb") as f:
                        for _ in range(20):
                            offset = rng.randrange(len(body))
                            f.seek(offset)
                            if f.read(4096) != body[offset : offset + 4096]:
                                tally.wrong(f"random read {name}@{offset}")
                                return
                    tally.ok("random reads x20")
                except OSError as exc:
                    tally.error("random reads", exc.strerror or str(exc))

            def blackouts() -> None:
                time.sleep(40)
                dark.set()
                time.sleep(5)
                dark.clear()

            def restart_service() -> None:
                time.sleep(60)
                if time.monotonic() > until - 10:
                    return
                stop(current[0].proc)
                try:
                    current[0] = start_service(work / "data", slots=2)
                    tally.ok("service restart")
                except RuntimeError as exc:
                    tally.error("service restart", str(exc))

            def kill_and_recover_mount() -> None:
                nonlocal victim
                time.sleep(30)
                if time.monotonic() > until - 10:
                    return
                assert victim is not None
                victim.proc.kill()
                victim.proc.wait()
                gone = sh(f"ls {victim.path}")
                recovered = subprocess.run(
                    taskfs_cmd("unmount", str(victim.path)),
                    capture_output=True,
                    text=True,
                    check=False,
                )
                if recovered.returncode != 0 or mount_entry(victim.path) is not None:
                    tally.error("recover killed mount", recovered.stderr + gone.stderr)
                    return
                victim = start_mount(current[0], victim.path, work / "cache-victim")
                listed = sh(f"ls {victim.path}")
                if listed.returncode != 0:
                    tally.error("recover killed mount", listed.stderr)
                else:
                    tally.ok("recover killed mount")

            def drop_page_cache() -> None:
                """Make the kernel ask the mounts again (root only), so copies and random reads
                keep going back to the flaky storage instead of the page cache."""
                time.sleep(10)
                try:
                    Path("/proc/sys/vm/drop_caches").write_text("1\n")
                    tally.ok("drop page cache")
                except OSError:
                    pass

            def sample_memory() -> None:
                for name, mount in (("local mount", local), ("cloud mount", cloud)):
                    assert mount is not None
                    rss = psutil.Process(mount.proc.pid).memory_info().rss / 1e6
                    memory[name].append((round(time.monotonic() - started), round(rss, 1)))
                time.sleep(5)

            workers = [
                (submit, 0.5),
                (watch, 0.2),
                (watch, 0.2),
                (listing, 0.5),
                (copy_local, 1.0),
                (copy_cloud, 0.5),
                (copy_cloud, 0.5),
                *[(random_reads, 0.1)] * 4,
                (blackouts, 0.0),
                (restart_service, 0.0),
                (drop_page_cache, 0.0),
                (kill_and_recover_mount, 0.0),
                (sample_memory, 0.0),
            ]
            threads = [
                threading.Thread(target=loop, args=(until, fn, pause), daemon=True)
                for fn, pause in workers
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=args.minutes * 60 + 240)
        finally:
            dark.clear()
            for mount in (local, cloud, victim):
                if mount is not None:
                    stop_mount(mount)
            stop(current[0].proc)
    elapsed = time.monotonic() - started
    report = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "minutes": round(elapsed / 60, 2),
        "operations": dict(sorted(tally.ops.items())),
        "errors": dict(sorted(tally.errors.items())),
        "wrong_bytes": tally.wrong_bytes,
        "memory_mb": {
            name: {
                "start": samples[0][1] if samples else None,
                "max": max((rss for _, rss in samples), default=None),
                "end": samples[-1][1] if samples else None,
                "every_5_s": " ".join(f"{rss:.0f}" for _, rss in samples),
            }
            for name, samples in memory.items()
        },
        "mount_exit_codes": {
            "local": local.proc.returncode if local else None,
            "cloud": cloud.proc.returncode if cloud else None,
        },
    }
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    return 1 if tally.wrong_bytes else 0


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.environ.pop("INDUCTIVA_API_URL", None)
    sys.exit(main())
