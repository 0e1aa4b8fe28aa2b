"""scripts/bench: DESIGN.md section 4 measured through a real mount, side by side.

Layout of a run:

1. the embedded service in a process, with datasets generated as real task outputs (many
   small files, a large stored member, a large deflated member of VTK-like text, a tree of
   small files to copy, a member of 2 GiB, and 1,000 tasks);
2. a shaping proxy on loopback in front of it (RTT and per-connection bandwidth, counting
   requests and bytes); everything measured goes through it;
3. taskfs mounted over the proxy; each workload runs with a fresh mount and an empty cache,
   next to its baselines: the whole-archive download + unzip that users do today, one raw
   ranged GET of the same bytes (the network's ceiling), remotezip, and ratarmount over HTTP
   where it installs.

Timings are medians over ``--runs`` (spread shown); request counts come from the proxy.
``--check`` asserts request counts (P1, P2, P6, P8) and the memory ceiling of M1-M3 (a peak
RSS is not a timing), never times.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import os
import random
import resource
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
import zipfile
import zlib
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import psutil
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shaping_proxy import Proxy, Shape, shaping_proxy

from taskfs.api.client import ApiClient
from taskfs.api.submit import submit_task
from taskfs.archive.zipindex import (
    TAIL_SIZE,
    Directory,
    build_tree,
    locate_directory,
    parse_directory,
)
from taskfs.config import ClientSettings
from taskfs.mounts import mounted_at

try:
    from remotezip import RemoteZip
except ImportError:  # the bench extra is not installed: that column stays empty
    RemoteZip = None

PY = sys.executable
ROOT = Path(__file__).resolve().parents[2]


# -- sizes -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    many_files: int
    copy_files: int
    copy_file_bytes: int
    stored_bytes: int
    deflate_bytes: int
    huge_bytes: int
    tasks: int
    runs: int
    random_reads: int
    # Memory under the worst patterns (M1-M3): a deflated member read at its tail, archives of
    # the deflated member read at random, handles streaming at once, and how far each streams.
    tail_bytes: int = 2 << 30
    spread_archives: int = 32
    handles: int = 64
    stream_bytes: int = 32 << 20

    # P10-P12: a root of many tasks (seeded as copies of a real ended task), an archive of
    # very many members, small files downloaded with ``taskfs tasks download``.
    listing_tasks: int = 0
    million: int = 0
    download_files: int = 0


FULL = Sizes(
    10_000,
    1_000,
    40_000,
    1 << 30,
    256 << 20,
    2 << 30,
    1_000,
    3,
    300,
    listing_tasks=20_000,
    million=1_000_000,
    download_files=20_000,
)
QUICK = Sizes(
    10_000,
    300,
    40_000,
    96 << 20,
    32 << 20,
    0,
    520,
    1,
    100,
    128 << 20,
    8,
    16,
    4 << 20,
    listing_tasks=2_000,
    million=0,
    download_files=2_000,
)
# The link profiles (DESIGN.md section 4; issue 13): (a) a capped link, (b) a VM next to its
# bucket, (c) another region. Throughput rows run on each, side by side in one run.
PROFILES = {
    "a": Shape(rtt=0.020, bandwidth=50e6),
    "b": Shape(rtt=0.020, bandwidth=0),
    "c": Shape(rtt=0.080, bandwidth=200e6),
}
# The mount's peak RSS under M1-M3 (DESIGN.md P9; asserted by --check: memory is no timing).
MEMORY_CEILING = 256e6


# -- processes -------------------------------------------------------------------------------------


def taskfs(*args: str) -> list[str]:
    return [PY, "-m", "taskfs", *args]


@dataclass
class Service:
    url: str
    key: str
    data: Path
    proc: subprocess.Popen[bytes]

    def call(self, fn: Callable[[ApiClient], Any], url: str | None = None) -> Any:
        async def main() -> Any:
            settings = ClientSettings(api_url=url or self.url, api_key=self.key, deadline=60)
            async with ApiClient.open(settings) as api:
                return await fn(api)

        return trio.run(main)


def start_service(data: Path) -> Service:
    data.mkdir(parents=True, exist_ok=True)
    with open(data / "bench-service.log", "wb") as log:
        proc = subprocess.Popen(
            taskfs("serve", "--port", "0", "--data-dir", str(data), "--slots", "2"),
            stdout=log,
            stderr=log,
        )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError, KeyError):
            info = json.loads((data / "server.json").read_text())
            if info["pid"] == proc.pid:
                return Service(info["url"], (data / "api_key").read_text().strip(), data, proc)
        time.sleep(0.05)
    raise RuntimeError("service did not start")


def mountinfo_has(path: Path) -> bool:
    return mounted_at(path) is not None


@dataclass
class Mount:
    path: Path
    proc: subprocess.Popen[bytes]
    cache: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        if mountinfo_has(self.path):
            subprocess.run(["fusermount3", "-u", "-z", str(self.path)], check=False)


def start_mount(
    path: Path, cache: Path, api_url: str, key_file: Path, *extra: str, keep_cache: bool = False
) -> Mount:
    if not keep_cache:
        shutil.rmtree(cache, ignore_errors=True)
    path.mkdir(parents=True, exist_ok=True)
    log = cache.parent / f"{path.name}.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            taskfs(
                "mount",
                str(path),
                "--foreground",
                "--api-url",
                api_url,
                "--api-key-file",
                str(key_file),
                "--cache-dir",
                str(cache),
                *extra,
            ),
            stdout=out,
            stderr=out,
        )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if mountinfo_has(path):
            return Mount(path, proc, cache)
        if proc.poll() is not None:
            raise RuntimeError(f"mount failed: {log.read_text()[-2000:]}")
        time.sleep(0.05)
    raise RuntimeError("mount did not come up")


def drop_page_cache() -> bool:
    """Drop the kernel page cache (root only); False where not allowed."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return True
    except OSError:
        return False


class PeakRss:
    """Peak RSS of a process while the block runs (sampled every 20 ms)."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(psutil.Error):
                self.peak = max(self.peak, self.proc.memory_info().rss)
            self._stop.wait(0.02)

    def __enter__(self) -> PeakRss:
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# The knob of the guest kernel's free page reporting (virtio-balloon), where it has one.
PAGE_REPORTING_DELAY = Path("/sys/module/page_reporting/parameters/min_free_ms")


@contextlib.contextmanager
def page_reporting_held_off(delay_ms: int = 300_000) -> Iterator[bool]:
    """Hold off the guest's free page reporting while the bench measures, where the kernel
    lets root do so; restore it after. Yields whether it did.

    On a virtual machine whose host takes back the memory the guest frees (virtio-balloon
    free page reporting, as on the machine this project is built on), the first touch of
    such a page afterwards is slow, and the kernel charges it to the CPU of whoever touches
    it: the page cache a FUSE reply fills is touched by the file system's process. A minimal
    pyfuse3 file system measured 0.26-2.31 s per GiB for the same ``cat`` (and the mount
    4.5-9.0 for a deflated member) as the host took pages back or not; with pages reported
    only after they have been free for ``delay_ms``, 0.23-0.25 (and 4.5-4.9), run after run.
    This is the guest's memory given back a few minutes late, nothing else. (300 s is the
    most this kernel takes: it refuses more with EINVAL, and the first version of this asked
    for 600 s, so its runs measured with reporting on.)"""
    try:
        before = PAGE_REPORTING_DELAY.read_text().strip()
        PAGE_REPORTING_DELAY.write_text(f"{delay_ms}\n")
    except OSError:
        yield False
        return
    try:
        yield True
    finally:
        PAGE_REPORTING_DELAY.write_text(f"{before}\n")


class Cpu:
    """CPU time (user + system, all threads) a process spends while the block runs."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.seconds = 0.0

    def __enter__(self) -> Cpu:
        times = self.proc.cpu_times()
        self._start = times.user + times.system
        return self

    def __exit__(self, *exc: object) -> None:
        times = self.proc.cpu_times()
        self.seconds = times.user + times.system - self._start

    def per_gib(self, size: int) -> float:
        return self.seconds / (size / 2**30)


def children_cpu(command: str, timeout: float = 900) -> float:
    """CPU seconds (user + system) of a shell command and everything it ran."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    sh(command, timeout)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


# -- datasets --------------------------------------------------------------------------------------

GEN_MANY = r"""
import os, sys
n = int(sys.argv[1])
for i in range(n):
    d = f"run{i % 40:02d}/step{i % 7}"
    os.makedirs(d, exist_ok=True)
    with open(f"{d}/probe_{i:05d}.csv", "w") as f:
        f.write(f"t,x,y,z\n{i*0.01:.2f},{i%13}.5,{i%17}.25,{i%19}.125\n")
"""

GEN_TEXT = r"""
import os, random, sys
target, n, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(7)
def block(seed, size):
    r = random.Random(seed)
    lines, total = [], 0
    while total < size:
        line = f"{r.uniform(-1,1):.6f} {r.uniform(-1,1):.6f} {r.uniform(0,2):.6f} "
        line += f"{r.randint(0,9999)}\n"
        lines.append(line); total += len(line)
    return "".join(lines).encode()[:size]
if n == 1:
    blocks = [block(s, 4 << 20) for s in range(8)]
    with open(target, "wb") as f:
        written = 0
        i = 0
        while written < size:
            chunk = blocks[i % 8][: size - written]
            f.write(b"# block %d\n" % i + chunk); written += len(chunk); i += 1
else:
    for i in range(n):
        d = f"{target}/series{i % 10}"
        os.makedirs(d, exist_ok=True)
        with open(f"{d}/ParticleData_Fluid_{i:04d}.vtk", "wb") as f:
            f.write(b"# vtk DataFile Version 3.0\nPOINTS\n" + block(i, size))
"""


@dataclass
class Dataset:
    task_id: str
    member: str  # a representative member (relative to artifacts/)
    urls: dict[str, str] = field(default_factory=dict)  # signed URL through each profile's proxy
    member_range: tuple[int, int] = (0, 0)  # compressed bytes of ``member`` in the archive
    member_size: int = 0
    archive_size: int = 0


def generate(
    service: Service, sizes: Sizes, work: Path, memory_only: bool = False
) -> dict[str, Dataset]:
    scripts = work / "gen"
    scripts.mkdir(parents=True, exist_ok=True)
    (scripts / "many.py").write_text(GEN_MANY)
    (scripts / "text.py").write_text(GEN_TEXT)
    jobs: dict[str, tuple[list[str], str]] = {
        "many": ([f"{PY} many.py {sizes.many_files}"], "run00/step0/probe_00000.csv"),
        "copy": (
            [f"{PY} text.py tree {sizes.copy_files} {sizes.copy_file_bytes}"],
            "tree/series0/ParticleData_Fluid_0000.vtk",
        ),
        "stored": ([f"head -c {sizes.stored_bytes} /dev/urandom > big.bin"], "big.bin"),
        "deflate": ([f"{PY} text.py sim.vtk 1 {sizes.deflate_bytes}"], "sim.vtk"),
    }
    if sizes.download_files:
        jobs["small"] = ([f"{PY} many.py {sizes.download_files}"], "run00/step0/probe_00000.csv")
    if sizes.huge_bytes:
        jobs["huge"] = ([f"head -c {sizes.huge_bytes} /dev/urandom > huge.bin"], "huge.bin")
    jobs["tail"] = ([f"{PY} text.py tail.vtk 1 {sizes.tail_bytes}"], "tail.vtk")
    if memory_only:
        jobs = {name: jobs[name] for name in ("deflate", "tail")}

    async def make(api: ApiClient) -> tuple[dict[str, Dataset], list[str]]:
        ids = {}
        for name, (commands, _) in jobs.items():
            ids[name] = await submit_task(api, commands, input_dir=scripts, project="bench")
        filler_count = max(0, sizes.tasks - len(jobs))
        limiter = trio.CapacityLimiter(16)

        async def filler() -> None:
            async with limiter:
                await submit_task(api, ["true"], project="filler")

        async with trio.open_nursery() as nursery:
            for _ in range(filler_count):
                nursery.start_soon(filler)
        for name, task_id in ids.items():
            status = await until(partial(api.get_status, task_id), lambda s: s.is_terminated)
            if status.status != "success":
                raise RuntimeError(f"dataset {name} failed: {status.status}")
        # Every filler ended (its archive written): some of theirs are replaced below.
        while True:
            tasks = [t async for t in api.iter_tasks(project="filler")]
            if all(t.is_terminated for t in tasks):
                break
            await trio.sleep(0.2)
        fillers = [t.task_id for t in tasks]
        return {name: Dataset(ids[name], jobs[name][1]) for name in jobs}, fillers

    datasets, fillers = service.call(make)
    # M2/M3: more archives holding the deflated member. Packing it again for each would take
    # minutes: the filler tasks' archives are replaced by hard links to it (distinct objects
    # and URLs to taskfs; this is the benchmark's own data dir).
    storage = service.data / "storage"
    source = storage / datasets["deflate"].task_id / "output.zip"
    spread = [datasets["deflate"]]
    for task_id in fillers[: sizes.spread_archives - 1]:
        target = storage / task_id / "output.zip"
        target.unlink()
        os.link(source, target)
        spread.append(Dataset(task_id, "sim.vtk"))
    for i, dataset in enumerate(spread):
        datasets[f"spread{i:02d}"] = dataset
    if sizes.million and not memory_only:
        # P11: an archive of very many members in place of another filler's.
        task_id = fillers[sizes.spread_archives]
        write_million(storage / task_id / "output.zip", sizes.million)
        datasets["million"] = Dataset(task_id, million_member(sizes.million))
    if sizes.listing_tasks > sizes.tasks and not memory_only:
        seed_tasks(service.data, sizes.listing_tasks - sizes.tasks, fillers[-1])
    return dict(datasets)


def million_member(count: int, i: int | None = None) -> str:
    """The name of member ``i`` (default: the middle one) of ``write_million``'s archive."""
    i = count // 2 if i is None else i
    return f"case{i * 1000 // count:04d}/probe_{i:07d}.csv"


def write_million(path: Path, count: int) -> None:
    """``count`` tiny stored members in 1,000 directories, written with zipfile."""
    tmp = path.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zf:
        for i in range(count):
            zf.writestr(zipfile.ZipInfo(f"artifacts/{million_member(count, i)}"), b"%d\n" % i)
    tmp.replace(path)


def seed_tasks(data: Path, count: int, template: str) -> None:
    """``count`` more ended tasks, copies of the ended task ``template`` under new ids, written
    into the service's SQLite store (submitting and running them would take most of an hour).
    The service lists them like any other: the benchmark's own data dir."""
    db = sqlite3.connect(data / "tasks.sqlite3", timeout=30)
    try:
        columns = [row[1] for row in db.execute("PRAGMA table_info(tasks)") if row[1] != "seq"]
        history = [
            row[1] for row in db.execute("PRAGMA table_info(status_history)") if row[1] != "id"
        ]
        others = [c for c in columns if c != "task_id"]
        h_others = [c for c in history if c != "task_id"]
        db.execute("BEGIN IMMEDIATE")
        for i in range(count):
            task_id = f"seeded{i:06d}{template[:10]}"
            db.execute(
                f"INSERT INTO tasks (task_id, {', '.join(others)}) "
                f"SELECT ?, {', '.join(others)} FROM tasks WHERE task_id = ?",
                (task_id, template),
            )
            db.execute(
                f"INSERT INTO status_history (task_id, {', '.join(h_others)}) "
                f"SELECT ?, {', '.join(h_others)} FROM status_history WHERE task_id = ?",
                (task_id, template),
            )
        db.execute("COMMIT")
    finally:
        db.close()


async def until(fetch: Callable[[], Awaitable[Any]], done: Callable[[Any], bool]) -> Any:
    """Poll ``fetch`` until ``done`` holds for its answer."""
    while True:
        value = await fetch()
        if done(value):
            return value
        await trio.sleep(0.5)


def describe(service: Service, proxies: dict[str, Proxy], datasets: dict[str, Dataset]) -> None:
    """Signed URLs through each proxy and the byte range of each representative member."""

    async def fill(api: ApiClient) -> None:
        for dataset in datasets.values():
            task = await api.get_task(dataset.task_id)
            assert task.storage_output_path
            response = await api.http.get(
                "/storage/zip-file-range",
                params={
                    "path": task.storage_output_path,
                    "zip_relative_path": "artifacts/",
                    "filename": dataset.member,
                },
            )
            rng = response.json()
            dataset.member_range = (rng["range_start"], rng["range_end"] + 1)
            # The member's own directory only: a whole listing of the million-member archive
            # is a JSON of a million entries (it has taken the service over a minute).
            folder, _, name = dataset.member.rpartition("/")
            relative = f"artifacts/{folder}/" if folder else "artifacts/"
            info = await api.zip_contents(task.storage_output_path, relative, recursive=False)
            dataset.archive_size = info.size
            dataset.member_size = next(m.size for m in info.contents if m.name == name)

    service.call(fill)

    for profile, proxy in proxies.items():

        async def urls(api: ApiClient, profile: str = profile) -> None:
            for dataset in datasets.values():
                task = await api.get_task(dataset.task_id)
                assert task.storage_output_path
                dataset.urls[profile] = await api.download_url(task.storage_output_path)

        service.call(urls, url=proxy.url)


# -- measurements ----------------------------------------------------------------------------------


@dataclass
class Result:
    workload: str
    target: str
    taskfs: list[float] = field(default_factory=list)  # seconds (or a value) per run
    baselines: dict[str, list[float]] = field(default_factory=dict)
    requests: dict[str, int] = field(default_factory=dict)
    bytes_down: int = 0
    peak_rss: int = 0
    cpu: list[float] = field(default_factory=list)  # the mount's CPU seconds per GiB read
    unit: str = "s"
    notes: list[str] = field(default_factory=list)
    ok: bool | None = None  # the whole target (timed parts judged on medians)
    counts_ok: bool | None = None  # the request-count part alone (what --check asserts)

    def median(self, values: list[float]) -> float:
        return statistics.median(values) if values else float("nan")


def sh(command: str, timeout: float = 900) -> float:
    start = time.perf_counter()
    result = subprocess.run(
        ["sh", "-c", command], capture_output=True, timeout=timeout, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"{command!r} failed: {result.stderr.decode()[-500:]}")
    return time.perf_counter() - start


def raw_get(url: str, start: int, end: int, inflate: bool = False) -> float:
    """One single-stream ranged GET of ``[start, end)`` (optionally inflated as it arrives)."""
    t0 = time.perf_counter()
    decoder = zlib.decompressobj(-15) if inflate else None
    with (
        httpx.Client(timeout=120) as client,
        client.stream(
            "GET", url, headers={"Range": f"bytes={start}-{end - 1}", "Accept-Encoding": "identity"}
        ) as response,
    ):
        assert response.status_code == 206, response.status_code
        for chunk in response.iter_raw(1 << 20):
            if decoder is not None:
                decoder.decompress(chunk)
    return time.perf_counter() - t0


def download_and_unzip(url: str, dest: Path) -> float:
    """What users do today: fetch the whole archive in one GET (curl), then unzip it (Info-ZIP
    where installed, else Python's zipfile)."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    archive = dest / "output.zip"
    if shutil.which("unzip") and shutil.which("curl"):
        return sh(f"curl -sf -o {archive} '{url}' && unzip -q {archive} -d {dest / 'out'}")
    t0 = time.perf_counter()
    with (
        httpx.Client(timeout=600) as client,
        client.stream("GET", url) as response,
        open(archive, "wb") as out,
    ):
        for chunk in response.iter_raw(1 << 20):
            out.write(chunk)
    with zipfile.ZipFile(archive) as zf:
        zf.extractall(dest / "out")
    return time.perf_counter() - t0


def remotezip_read(url: str, member: str) -> float | None:
    if RemoteZip is None:
        return None
    t0 = time.perf_counter()
    with RemoteZip(url, support_suffix_range=True) as rz, rz.open(f"artifacts/{member}") as f:
        while f.read(1 << 20):
            pass
    return time.perf_counter() - t0


@contextlib.contextmanager
def ratarmount(url: str, mountpoint: Path) -> Iterator[Path | None]:
    """Mount the archive's URL with ratarmount, if it is installed and can; else ``None``."""
    if shutil.which("ratarmount") is None and not (Path(PY).parent / "ratarmount").exists():
        yield None
        return
    binary = shutil.which("ratarmount") or str(Path(PY).parent / "ratarmount")
    mountpoint.mkdir(parents=True, exist_ok=True)
    index_dir = mountpoint.parent / f"{mountpoint.name}-index"
    shutil.rmtree(index_dir, ignore_errors=True)
    index_dir.mkdir()
    proc = subprocess.Popen(
        [binary, "--foreground", "--index-folders", str(index_dir), url, str(mountpoint)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while not mountinfo_has(mountpoint):
            if proc.poll() is not None or time.monotonic() > deadline:
                yield None
                return
            time.sleep(0.1)
        yield mountpoint
    finally:
        subprocess.run(
            ["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True, check=False
        )
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.terminate()
            proc.wait(timeout=20)


def entry_memory(service: Service, dataset: Dataset) -> float:
    """Bytes per archive entry of the parsed index and tree (tracemalloc)."""

    async def fetch(api: ApiClient) -> bytes:
        task = await api.get_task(dataset.task_id)
        assert task.storage_output_path
        url = await api.download_url(task.storage_output_path)
        async with httpx.AsyncClient(timeout=120) as http:
            return (await http.get(url)).content

    data = service.call(fetch)
    size = len(data)
    tail_start = max(0, size - TAIL_SIZE)
    location = locate_directory(data[tail_start:], tail_start, size)
    assert isinstance(location, Directory)
    directory = data[location.start : location.start + location.size]
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    entries = parse_directory(directory, location)
    tree = build_tree(entries)
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    del tree
    return (after - before) / len(entries)


# -- the workloads ---------------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, sizes: Sizes, work: Path) -> None:
        self.args = args
        self.sizes = sizes
        self.work = work
        self.results: dict[str, Result] = {}
        self.floors: dict[str, list[float]] = {}  # CPU seconds per GiB, per run
        self.total_tasks = 0
        self.env: dict[str, str] = {}

    def result(self, key: str, name: str, target: str, unit: str = "s") -> Result:
        if key not in self.results:
            self.results[key] = Result(name, target, unit=unit)
        return self.results[key]

    def run(
        self, service: Service, proxies: dict[str, Proxy], datasets: dict[str, Dataset]
    ) -> None:
        self.total_tasks = service.call(lambda api: api.list_page(1, 1)).total_size
        key_file = self.key_file = self.work / "key"
        key_file.write_text(service.key + "\n")
        key_file.chmod(0o600)
        first = next(iter(proxies))
        if self.args.only == "memory":
            self.memory(proxies[first], datasets)
            return
        for run in range(self.sizes.runs):
            # Profiles take turns within a run: the matrix is measured side by side.
            for profile, proxy in proxies.items():
                print(
                    f"  run {run + 1}/{self.sizes.runs}, link ({profile})",
                    file=sys.stderr,
                    flush=True,
                )
                mount = start_mount(self.work / "mnt", self.work / "cache", proxy.url, key_file)
                try:
                    if profile == first:
                        self.listing_rows(run, mount, proxy, datasets)
                    self.link_rows(run, mount, proxy, profile, datasets)
                    if profile == first:
                        self.local_rows(run, mount, proxy, datasets)
                finally:
                    mount.stop()
                self.download_rows(run, service, proxy, profile, datasets)
        self.once(service, proxies[first], datasets)

    def counted(self, proxy: Proxy, action: Callable[[], float]) -> tuple[float, dict[str, int]]:
        proxy.counters.reset()
        elapsed = action()
        time.sleep(0.05)  # let the last bytes be counted
        return elapsed, proxy.counters.snapshot()

    def listing_rows(self, run: int, mount: Mount, proxy: Proxy, ds: dict[str, Dataset]) -> None:
        """P8 and P10: the root listing (first, then unchanged), against paging the API."""
        m = mount.path
        pages = -(-self.total_tasks // 500)
        p8 = self.result(
            "P10",
            f"ls of the root with {self.total_tasks} tasks (P8 at 1,000)",
            f"first: {pages} list requests (500 per page), <= 1.2x paging the API alone; "
            "unchanged refresh: 1 request",
        )
        with PeakRss(mount.proc.pid) as rss:
            before = psutil.Process(mount.proc.pid).memory_info().rss
            elapsed, counts = self.counted(proxy, lambda: sh(f"ls {m} > /dev/null"))
        p8.taskfs.append(elapsed)
        p8.requests = counts
        first_ok = counts["list_requests"] == pages
        listing_bytes = max(0, rss.peak - before)
        time.sleep(2.2)  # past the listing's 2 s: the next ls refreshes
        again, counts_again = self.counted(proxy, lambda: sh(f"ls {m} > /dev/null"))
        time.sleep(2.2)
        long_form, counts_long = self.counted(proxy, lambda: sh(f"ls -l {m} > /dev/null"))
        p8.requests["repeat_requests"] = counts_again["requests"]
        p8.counts_ok = p8.counts_ok is not False and (
            first_ok and counts_again["requests"] == 1 and counts_long["api_requests"] <= 1
        )
        p8.ok = p8.counts_ok
        p8.notes = [
            f"unchanged refresh {again * 1000:.0f} ms, {counts_again['requests']} request(s)",
            f"ls -l {long_form * 1000:.0f} ms, {counts_long['api_requests']} request(s)",
            f"about {listing_bytes / max(1, self.total_tasks):.0f} bytes per task",
        ]
        p8.baselines.setdefault("paging the API alone", []).append(page_api(proxy, self.env))
        p8.peak_rss = rss.peak

    def link_rows(
        self, run: int, mount: Mount, proxy: Proxy, profile: str, ds: dict[str, Dataset]
    ) -> None:
        """The throughput rows, on every link profile: P2, P3, P4, P7."""
        m = mount.path
        rtt = proxy.shape.rtt

        # P2: one small member of an archive that is already open.
        copy = ds["copy"]
        sh(f"ls {m}/{copy.task_id}/outputs > /dev/null")
        p2 = self.result(
            f"P2{profile}",
            "cat one small member (archive open)",
            f"1 GET; <= 1 RTT + 20 ms = {(rtt + 0.020) * 1000:.0f} ms",
        )
        elapsed, counts = self.counted(
            proxy, lambda: sh(f"cat {m}/{copy.task_id}/outputs/{copy.member} > /dev/null")
        )
        p2.taskfs.append(elapsed)
        p2.requests = counts
        p2.counts_ok = p2.counts_ok is not False and (counts["storage_gets"] == 1)
        p2.ok = p2.counts_ok
        start, end = copy.member_range
        p2.baselines.setdefault("raw ranged GET (curl)", []).append(
            curl_get(copy.urls[profile], start, end)
        )
        if run == 0:
            remote = remotezip_read(copy.urls[profile], copy.member)
            if remote is not None:
                p2.baselines.setdefault("remotezip (open + read)", []).append(remote)

        # P3: a large stored member, sequentially, cold cache.
        stored = ds["stored"]
        p3 = self.result(
            f"P3{profile}",
            f"sequential read, {stored.member_size >> 20} MiB stored member",
            {"b": ">= 1.0x"}.get(profile, ">= 3x") + f" one raw GET; CPU <= {CPU_STORED} s/GiB",
        )
        with PeakRss(mount.proc.pid) as rss, Cpu(mount.proc.pid) as cpu:
            elapsed, counts = self.counted(
                proxy, lambda: sh(f"cat {m}/{stored.task_id}/outputs/big.bin > /dev/null")
            )
        p3.cpu.append(cpu.per_gib(stored.member_size))
        p3.taskfs.append(elapsed)
        p3.requests, p3.bytes_down = counts, counts["bytes_down"]
        p3.peak_rss = max(p3.peak_rss, rss.peak)
        start, end = stored.member_range
        p3.baselines.setdefault("raw GET (curl)", []).append(
            curl_get(stored.urls[profile], start, end)
        )
        if run == 0 and stored.member_size <= 128 << 20:
            remote = remotezip_read(stored.urls[profile], stored.member)
            if remote is not None:
                p3.baselines.setdefault("remotezip", []).append(remote)

        # P4: a deflated member, sequentially, cold cache.
        deflate = ds["deflate"]
        p4 = self.result(
            f"P4{profile}",
            f"sequential read, {deflate.member_size >> 20} MiB deflated member",
            {"a": ">= 1.5x", "b": ">= 1.0x"}.get(profile, ">= 1.0x")
            + f" raw GET + inflate; CPU <= {CPU_DEFLATE}x the curl + zlib floor",
        )
        with Cpu(mount.proc.pid) as cpu:
            elapsed, counts = self.counted(
                proxy, lambda: sh(f"cat {m}/{deflate.task_id}/outputs/sim.vtk > /dev/null")
            )
        p4.cpu.append(cpu.per_gib(deflate.member_size))
        p4.taskfs.append(elapsed)
        p4.requests, p4.bytes_down = counts, counts["bytes_down"]
        start, end = deflate.member_range
        p4.baselines.setdefault("raw GET + inflate (curl | zlib)", []).append(
            curl_get(deflate.urls[profile], start, end, inflate=True)
        )

        # P7: cp -r of the small-file tree.
        p7 = self.result(
            f"P7{profile}",
            f"cp -r outputs/ of {self.sizes.copy_files} small files",
            ("<= 1.0x" if profile == "b" else "<= 1.2x") + " download whole archive + unzip",
        )
        dest = self.work / "copy-out"
        shutil.rmtree(dest, ignore_errors=True)
        sh(f"ls {m}/{copy.task_id} > /dev/null")
        elapsed, counts = self.counted(
            proxy, lambda: sh(f"cp -r {m}/{copy.task_id}/outputs {dest}")
        )
        # cp read the small member of P2 from the cache: warm that one only, like P2 left it.
        p7.taskfs.append(elapsed)
        p7.requests, p7.bytes_down = counts, counts["bytes_down"]
        p7.baselines.setdefault("download whole + unzip", []).append(
            download_and_unzip(copy.urls[profile], self.work / "baseline-copy")
        )
        if run == 0:
            with ratarmount(copy.urls[profile], self.work / "rm-p7") as rm:
                if rm is not None:
                    out = self.work / "rm-copy"
                    shutil.rmtree(out, ignore_errors=True)
                    p7.baselines.setdefault("ratarmount cp -r", []).append(
                        sh(f"cp -r {rm}/artifacts {out}")
                    )

    def download_rows(
        self, run: int, service: Service, proxy: Proxy, profile: str, ds: dict[str, Dataset]
    ) -> None:
        """P12: ``taskfs tasks download`` (the whole command), against download + unzip."""
        for name in ("copy", "small"):
            dataset = ds[name]
            files = self.sizes.copy_files if name == "copy" else self.sizes.download_files
            row = self.result(
                f"P12{profile}-{files}",
                f"taskfs tasks download of {files} files",
                "<= 1.2x download + unzip; <= 0.1 requests per file",
            )
            dest = self.work / "download-out"
            shutil.rmtree(dest, ignore_errors=True)
            env = {**os.environ, **self.env, "INDUCTIVA_API_URL": proxy.url}
            # A user's Python caches compiled modules; this machine's environment turns that
            # off, which would add ~0.15 s of compiling to every command.
            env.pop("PYTHONDONTWRITEBYTECODE", None)
            command = taskfs("tasks", "download", dataset.task_id, "--dir", str(dest))
            elapsed, counts = self.counted(proxy, partial(timed_run, command, env))
            row.taskfs.append(elapsed)
            row.requests, row.bytes_down = counts, counts["bytes_down"]
            per_file = counts["storage_gets"] / files
            row.notes = [f"{per_file:.3f} storage requests per file"]
            row.counts_ok = row.counts_ok is not False and per_file <= 0.1
            row.baselines.setdefault("download whole + unzip", []).append(
                download_and_unzip(dataset.urls[profile], self.work / "baseline-download")
            )
            row.ok = row.counts_ok

    def local_rows(self, run: int, mount: Mount, proxy: Proxy, ds: dict[str, Dataset]) -> None:
        """The rows measured on the first profile only: P1, P5, P6, P9."""
        m = mount.path
        copy, stored, deflate = ds["copy"], ds["stored"], ds["deflate"]
        profile = next(iter(copy.urls))
        # P1: open a 10,000-member archive and ls -lR; then again.
        many = ds["many"]
        p1 = self.result(
            "P1",
            f"open a {self.sizes.many_files}-member archive + ls -lR",
            "<= 2 GETs; repeat: 0 requests",
        )
        elapsed, counts = self.counted(
            proxy, lambda: sh(f"ls -lR {m}/{many.task_id}/outputs > /dev/null")
        )
        again, counts_again = self.counted(
            proxy, lambda: sh(f"ls -lR {m}/{many.task_id}/outputs > /dev/null")
        )
        p1.taskfs.append(elapsed)
        p1.requests = {**counts, "repeat_requests": counts_again["requests"]}
        p1.bytes_down = counts["bytes_down"]
        p1.counts_ok = p1.counts_ok is not False and (
            counts["storage_gets"] <= 2 and counts_again["requests"] == 0
        )
        p1.ok = p1.counts_ok
        p1.notes = [f"repeat listing {again * 1000:.0f} ms"]

        # P13: the same repeated ls -lR where extended attributes are answered (--xattr), side
        # by side with the default (none: the kernel stops asking).
        p13 = self.result(
            "P13",
            f"repeated ls -lR of {self.sizes.many_files} members: default vs --xattr",
            "default: no more than without attributes (they are off unless --xattr)",
        )
        with_xattr = start_mount(
            self.work / "mnt-xattr", self.work / "cache-xattr", proxy.url, self.key_file, "--xattr"
        )
        try:
            listing = f"ls -lR {with_xattr.path}/{many.task_id}/outputs > /dev/null"
            sh(listing)
            p13.baselines.setdefault("--xattr", []).append(sh(listing))
            p13.taskfs.append(sh(f"ls -lR {m}/{many.task_id}/outputs > /dev/null"))
        finally:
            with_xattr.stop()
        if run == 0:
            with ratarmount(many.urls[profile], self.work / "rm-p1") as rm:
                if rm is not None:
                    proxy.counters.reset()
                    t = sh(f"ls -lR {rm} > /dev/null")
                    p1.baselines.setdefault("ratarmount", []).append(t)
                    p1.notes.append(f"ratarmount: {proxy.counters.snapshot()['requests']} requests")

        # P5: random 4 KiB reads after one pass.
        p5 = self.result(
            "P5",
            f"random 4 KiB reads, {deflate.member_size >> 20} MiB deflated member, after one pass",
            "p50 <= 10 ms",
            unit="ms",
        )
        path = m / deflate.task_id / "outputs" / "sim.vtk"
        warm = random_reads(path, deflate.member_size, self.sizes.random_reads, seed=run)
        dropped = drop_page_cache()
        cold = random_reads(path, deflate.member_size, self.sizes.random_reads, seed=run + 100)
        p5.taskfs.append(statistics.median(warm) * 1000)
        p5.baselines.setdefault("page cache dropped (p50)", []).append(
            statistics.median(cold) * 1000
        )
        p5.baselines.setdefault("page cache dropped (p90)", []).append(
            sorted(cold)[int(len(cold) * 0.9)] * 1000
        )
        if not dropped:
            p5.notes.append("could not drop the page cache (not root)")
        p5.ok = p5.ok is not False and (
            statistics.median(warm) <= 0.010 and statistics.median(cold) <= 0.010
        )

        # P6: re-read everything read so far.
        p6 = self.result("P6", "re-read of everything already read", "0 requests")

        def reread() -> float:
            t = sh(f"cat {m}/{copy.task_id}/outputs/{copy.member} > /dev/null")
            t += sh(f"cat {m}/{stored.task_id}/outputs/big.bin > /dev/null")
            t += sh(f"cat {m}/{deflate.task_id}/outputs/sim.vtk > /dev/null")
            t += sh(f"ls -lR {m}/{many.task_id}/outputs > /dev/null")
            return t

        elapsed, counts = self.counted(proxy, reread)
        p6.taskfs.append(elapsed)
        p6.requests = counts
        p6.counts_ok = p6.counts_ok is not False and (counts["requests"] == 0)
        p6.ok = p6.counts_ok

        # P15: re-reads served from the memory tier: the stored member's last 24 MiB (the
        # memory tier holds 32), the kernel's page cache dropped before each, so that every
        # read reaches the mount. About 1 GiB in all, for a CPU figure above the noise.
        self.memory_reread(mount, stored)

        # P9: memory while streaming the largest member.
        big = ds.get("huge", stored)
        p9 = self.result(
            "P9",
            f"peak RSS streaming a {big.member_size >> 20} MiB member",
            "<= 200 MB; <= 300 bytes per entry",
            unit="MB",
        )
        sh(f"ls {m}/{big.task_id}/outputs > /dev/null")
        before = psutil.Process(mount.proc.pid).memory_info().rss
        with PeakRss(mount.proc.pid) as rss, Cpu(mount.proc.pid) as cpu:
            sh(f"cat {m}/{big.task_id}/outputs/{big.member} > /dev/null")
        if big is not stored:  # (a member read before comes from the kernel's cache)
            p9.cpu.append(cpu.per_gib(big.member_size))
        p9.notes.append(f"RSS before the stream {before / 1e6:.0f} MB")
        p9.taskfs.append(rss.peak / 1e6)
        p9.peak_rss = rss.peak
        p9.ok = p9.ok is not False and rss.peak <= 200e6

        # P14: the stored member again, from the disk cache: a second mount on the same cache
        # directory (nothing in its memory) and the kernel's page cache dropped.
        p14 = self.result(
            "P14",
            f"re-read of the {stored.member_size >> 20} MiB stored member from the disk cache",
            f"0 requests; CPU <= {CPU_DISK} s/GiB",
        )
        time.sleep(1)  # the last segments reach the disk
        disk_mount = start_mount(
            self.work / "mnt-disk", mount.cache, proxy.url, self.key_file, keep_cache=True
        )
        try:
            sh(f"ls {disk_mount.path}/{stored.task_id}/outputs > /dev/null")
            drop_page_cache()
            with Cpu(disk_mount.proc.pid) as cpu:
                elapsed, counts = self.counted(
                    proxy,
                    lambda: sh(
                        f"cat {disk_mount.path}/{stored.task_id}/outputs/big.bin > /dev/null"
                    ),
                )
        finally:
            disk_mount.stop()
        p14.taskfs.append(elapsed)
        p14.cpu.append(cpu.per_gib(stored.member_size))
        p14.requests = counts
        p14.counts_ok = p14.counts_ok is not False and counts["storage_gets"] == 0
        p14.ok = p14.counts_ok and statistics.median(p14.cpu) <= CPU_DISK
        if not self.args.check:  # CPU is reported, never checked: --check saves the time
            self.floor_rows(proxy, ds)

    def memory_reread(self, mount: Mount, stored: Dataset) -> None:
        """P15: CPU per GiB of reads the mount answers from its memory tier."""
        tail, times = REREAD_TAIL, 4 if self.args.quick else REREAD_TIMES
        p15 = self.result(
            "P15",
            f"re-read of {tail >> 20} MiB from the memory tier (page cache dropped), {times} times",
            f"CPU <= {CPU_MEMORY} s/GiB",
        )
        command = f"tail -c {tail} {mount.path}/{stored.task_id}/outputs/big.bin > /dev/null"
        for _ in range(2):  # into the memory tier (the kernel's copy dropped: it reaches us)
            if not drop_page_cache():
                p15.notes.append("could not drop the page cache (not root): not measured")
                return
            sh(command)
        before = mount_counts(mount)
        seconds = elapsed = 0.0
        for _ in range(times):
            drop_page_cache()
            with Cpu(mount.proc.pid) as cpu:
                elapsed += sh(command)
            seconds += cpu.seconds
        after = mount_counts(mount)
        p15.taskfs.append(elapsed)
        p15.cpu.append(seconds / (times * tail / 2**30))
        # What the reads found in memory: a run that loaded blocks from disk says so.
        hits = {k: after.get(k, 0) - before.get(k, 0) for k in ("memory_hits", "disk_hits")}
        p15.notes.append(f"cache hits memory {hits['memory_hits']}, disk {hits['disk_hits']}")
        p15.ok = statistics.median(p15.cpu) <= CPU_MEMORY

    def floor_rows(self, proxy: Proxy, ds: dict[str, Dataset]) -> None:
        """What the same bytes cost without taskfs, in CPU per GiB, measured in this run."""
        stored, deflate = ds["stored"], ds["deflate"]
        profile = next(iter(stored.urls))
        gib, gib_out = stored.member_size / 2**30, deflate.member_size / 2**30
        start, end = stored.member_range
        floors = self.floors
        get = curl_command(stored.urls[profile], start, end)
        floors.setdefault("curl, one GET of the stored member", []).append(children_cpu(get) / gib)
        inflate = curl_command(deflate.urls[profile], *deflate.member_range, inflate=True)
        python_alone = children_cpu(f"{PY} -c 'import sys, zlib' < /dev/null")
        floors.setdefault(INFLATE_FLOOR, []).append(
            (children_cpu(inflate) - python_alone) / gib_out
        )
        fetch = f"{PY} {FLOORS} fetch '{stored.urls[profile]}' {start} {end}"
        starting = children_cpu(f"{PY} {FLOORS} none")
        floors.setdefault("taskfs's fetch layer alone (http.client readinto)", []).append(
            (children_cpu(fetch) - starting) / gib
        )
        floors.setdefault("a minimal pyfuse3 file system serving memory", []).append(
            memfs_floor(self.work / "mnt-floor", stored.member_size)
        )

    def memory(self, proxy: Proxy, datasets: dict[str, Dataset]) -> None:
        """M1-M3: the mount's peak RSS under the worst patterns (a fresh mount)."""
        key_file = self.work / "key"
        mount = start_mount(self.work / "mnt", self.work / "cache", proxy.url, key_file)
        try:
            m = mount.path
            tail = datasets["tail"]
            m1 = self.result(
                "M1",
                f"tail -c 100 of a {tail.member_size >> 20} MiB deflated member",
                f"peak RSS <= {MEMORY_CEILING / 1e6:.0f} MB",
                unit="MB",
            )
            sh(f"ls {m}/{tail.task_id}/outputs > /dev/null")
            with PeakRss(mount.proc.pid) as rss:
                took = sh(f"tail -c 100 {m}/{tail.task_id}/outputs/{tail.member} > /dev/null")
            m1.taskfs.append(rss.peak / 1e6)
            m1.peak_rss = rss.peak
            m1.notes.append(f"{took:.1f} s")
            spread = [d for k, d in sorted(datasets.items()) if k.startswith("spread")]
            paths = [m / d.task_id / "outputs" / d.member for d in spread]
            size = spread[0].member_size
            m2 = self.result(
                "M2",
                f"random 4 KiB reads across {len(paths)} archives of "
                f"{size >> 20} MiB deflated members",
                f"peak RSS <= {MEMORY_CEILING / 1e6:.0f} MB",
                unit="MB",
            )
            rng = random.Random(1)
            with PeakRss(mount.proc.pid) as rss:
                for _ in range(8):
                    for path in paths:
                        fd = os.open(path, os.O_RDONLY)
                        try:
                            os.pread(fd, 4096, rng.randrange(size - 4096))
                        finally:
                            os.close(fd)
            m2.taskfs.append(rss.peak / 1e6)
            m2.peak_rss = rss.peak
            m3 = self.result(
                "M3",
                f"{self.sizes.handles} handles streaming at once "
                f"({self.sizes.stream_bytes >> 20} MiB each, deflated)",
                f"peak RSS <= {MEMORY_CEILING / 1e6:.0f} MB",
                unit="MB",
            )
            drop_page_cache()

            def stream(path: Path, start: int) -> None:
                fd = os.open(path, os.O_RDONLY)
                try:
                    offset = start
                    while offset < start + self.sizes.stream_bytes:
                        if not os.pread(fd, 128 << 10, offset):
                            break
                        offset += 128 << 10
                finally:
                    os.close(fd)

            jobs = [
                (paths[i % len(paths)], (i // len(paths)) * self.sizes.stream_bytes)
                for i in range(self.sizes.handles)
            ]
            with PeakRss(mount.proc.pid) as rss:
                threads = [threading.Thread(target=stream, args=job) for job in jobs]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join()
            m3.taskfs.append(rss.peak / 1e6)
            m3.peak_rss = rss.peak
            for row in (m1, m2, m3):
                row.ok = row.counts_ok = row.peak_rss <= MEMORY_CEILING
        finally:
            mount.stop()

    def once(self, service: Service, proxy: Proxy, datasets: dict[str, Dataset]) -> None:
        self.memory(proxy, datasets)
        profile = next(iter(datasets["many"].urls))
        p9 = self.results["P9"]
        per_entry = entry_memory(service, datasets["many"])
        p9.notes.append(f"index + tree: {per_entry:.0f} bytes per entry")
        p9.ok = bool(p9.ok) and per_entry <= 300
        p1 = self.results["P1"]
        many = datasets["many"]
        p1.baselines.setdefault("download whole + unzip -l", []).append(
            timed_download_list(many.urls[profile])
        )
        if "million" in datasets:
            self.million(service, proxy, datasets["million"], profile)
        # The timed targets, judged on medians (reported, never asserted).
        med = statistics.median
        for key, r in self.results.items():
            if not r.taskfs or not r.baselines:
                continue
            taken, base = med(r.taskfs), med(next(iter(r.baselines.values())))
            row, link = (
                key[:2] if key[:3] != "P12" else "P12",
                key[2:3] if key[:3] != "P12" else key[3:4],
            )
            if row == "P2":
                r.ok = bool(r.counts_ok) and taken <= PROFILES[link].rtt + 0.020
            elif row == "P3":
                r.ok = base >= (1.0 if link == "b" else 3.0) * taken and med(r.cpu) <= CPU_STORED
            elif row == "P4":
                floor = self.floors.get(INFLATE_FLOOR)
                r.ok = base >= (1.5 if link == "a" else 1.0) * taken and (
                    floor is None or med(r.cpu) <= CPU_DEFLATE * med(floor)
                )
            elif row == "P7":
                r.ok = taken <= (1.0 if link == "b" else 1.2) * base
            elif row == "P12" or key == "P10":
                r.ok = bool(r.counts_ok) and taken <= 1.2 * base
        for key in ("P3a", "P9"):
            if key in self.results:
                r = self.results[key]
                r.notes.append(f"peak RSS {max(r.peak_rss, 0) / 1e6:.0f} MB")

    def million(self, service: Service, proxy: Proxy, dataset: Dataset, profile: str) -> None:
        """P11: an archive of very many members: open, ls of the top, cat of one member."""
        key_file = self.work / "key"
        row = self.result(
            "P11",
            f"open a {self.sizes.million:,}-member archive, ls the top, cat one member",
            "<= 3 GETs; mount RSS grows <= 150 bytes per entry",
        )
        mount = start_mount(self.work / "mnt", self.work / "cache", proxy.url, key_file)
        try:
            m = mount.path
            sh(f"ls {m}/{dataset.task_id} > /dev/null")
            before = psutil.Process(mount.proc.pid).memory_info().rss
            with PeakRss(mount.proc.pid) as rss:
                elapsed, counts = self.counted(
                    proxy,
                    lambda: sh(
                        f"ls {m}/{dataset.task_id}/outputs > /dev/null && "
                        f"cat {m}/{dataset.task_id}/outputs/{dataset.member} > /dev/null"
                    ),
                )
            row.taskfs.append(elapsed)
            row.requests, row.bytes_down = counts, counts["bytes_down"]
            row.peak_rss = rss.peak
            grown = max(0, rss.peak - before)
        finally:
            mount.stop()
        per_entry = entry_memory(service, dataset)
        row.notes = [
            f"index + tree {per_entry:.0f} bytes per entry (tracemalloc)",
            f"mount RSS grew {grown / self.sizes.million:.0f} bytes per entry",
        ]
        row.counts_ok = counts["storage_gets"] <= 3
        # The target is the mount's resident memory (what a user pays), not the live objects.
        row.ok = row.counts_ok and grown / self.sizes.million <= 150
        url = dataset.urls[profile]
        row.baselines.setdefault("download + unzip -l", []).append(
            sh(f"curl -s -o {self.work}/million.zip '{url}' && unzip -l {self.work}/million.zip")
        )
        t0 = time.perf_counter()  # ratarmount indexes before its mount appears: count that
        with ratarmount(url, self.work / "rm-p11") as rm:
            if rm is not None:
                member = rm / "artifacts" / dataset.member
                sh(f"ls {rm}/artifacts > /dev/null && cat {member} > /dev/null")
                row.baselines.setdefault("ratarmount (mount + ls + cat)", []).append(
                    time.perf_counter() - t0
                )


FLOORS = Path(__file__).with_name("floors.py")
# The CPU targets (seconds of the mount process per GiB read), judged on medians.
CPU_STORED = 2.0
CPU_DEFLATE = 1.2  # times the curl + zlib floor
CPU_DISK = 1.0
CPU_MEMORY = 0.8
REREAD_TAIL = 24 << 20
REREAD_TIMES = 40
INFLATE_FLOOR = "curl + zlib inflate of the deflated member (per GiB out)"


def mount_counts(mount: Mount) -> dict[str, int]:
    """The mount's cache counters (memory and disk hits, misses) from its stats file."""
    document = json.loads((mount.path / ".taskfs" / "stats").read_text())
    return {k: int(v) for k, v in document.get("cache", {}).items()}


def memfs_floor(mountpoint: Path, size: int) -> float:
    """CPU per GiB of a minimal pyfuse3 file system answering ``cat`` of ``size`` bytes."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([PY, str(FLOORS), "memfs", str(mountpoint), str(size)])
    try:
        deadline = time.monotonic() + 30
        while not mountinfo_has(mountpoint):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the floor file system did not mount")
            time.sleep(0.05)
        with Cpu(proc.pid) as cpu:
            sh(f"cat {mountpoint}/data > /dev/null")
        return cpu.per_gib(size)
    finally:
        subprocess.run(["fusermount3", "-u", str(mountpoint)], check=False)
        proc.wait(timeout=30)


def curl_get(url: str, start: int, end: int, inflate: bool = False) -> float:
    """One single-stream ranged GET of ``[start, end)`` by curl (optionally inflated as it
    arrives, by zlib in a pipe): the network's ceiling for one connection."""
    return sh(curl_command(url, start, end, inflate))


def curl_command(url: str, start: int, end: int, inflate: bool = False) -> str:
    """The shell command of ``curl_get``."""
    command = f"curl -sf -H 'Range: bytes={start}-{end - 1}' '{url}'"
    return f"{command} | {PY} -c '{INFLATE}'" if inflate else f"{command} > /dev/null"


INFLATE = (
    "import sys, zlib; d = zlib.decompressobj(-15); r = sys.stdin.buffer; "
    '[d.decompress(c) for c in iter(lambda: r.read(1 << 20), b"")]'
)


def timed_run(command: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, timeout=1800, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{command!r} failed: {result.stderr.decode()[-500:]}")
    return time.perf_counter() - t0


def page_api(proxy: Proxy, env: dict[str, str]) -> float:
    """Every page of the task list, one after another, as raw JSON: the API's own cost."""
    t0 = time.perf_counter()
    with httpx.Client(
        base_url=proxy.url, headers={"X-API-Key": env["INDUCTIVA_API_KEY"]}, timeout=120
    ) as client:
        page = 1
        while True:
            body = client.get("/tasks", params={"page": page, "per_page": 500}).json()
            if len(body["tasks"]) < 500 or page * 500 >= body["total_size"]:
                break
            page += 1
    return time.perf_counter() - t0


def timed_download_list(url: str) -> float:
    t0 = time.perf_counter()
    with httpx.Client(timeout=600) as client:
        data = client.get(url).content
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        zf.infolist()
    return time.perf_counter() - t0


def random_reads(path: Path, size: int, count: int, seed: int) -> list[float]:
    rng = random.Random(seed)
    times = []
    fd = os.open(path, os.O_RDONLY)
    try:
        for _ in range(count):
            offset = rng.randrange(0, max(1, size - 4096))
            t0 = time.perf_counter()
            os.pread(fd, 4096, offset)
            times.append(time.perf_counter() - t0)
    finally:
        os.close(fd)
    return times


# -- output ----------------------------------------------------------------------------------------


def fmt(values: list[float], unit: str) -> str:
    if not values:
        return "-"
    med = statistics.median(values)
    scale = 1000 if unit == "s" else 1
    shown = f"{med * scale:.0f} ms" if unit == "s" else f"{med:.1f} {unit}"
    if len(values) > 1:
        spread = (max(values) - min(values)) * scale
        shown += f" ±{spread / 2:.0f}"
    return shown


def fmt_cpu(values: list[float]) -> str:
    if not values:
        return "-"
    shown = f"{statistics.median(values):.2f}"
    if len(values) > 1:
        shown += f" ±{(max(values) - min(values)) / 2:.2f}"
    return shown


def ratio(result: Result) -> str:
    if not result.baselines or not result.taskfs or result.unit != "s":
        return "-"
    name, values = next(iter(result.baselines.items()))
    return f"{statistics.median(values) / statistics.median(result.taskfs):.2f}x ({name})"


def link_of(key: str) -> str:
    """The profile letter of a row key (``P3b``, ``P12a-1000``), ``-`` for rows on one link."""
    letter = key.removeprefix("P").lstrip("0123456789")[:1]
    return letter if letter in PROFILES else "-"


def report(bench: Bench, profiles: dict[str, Shape], sizes: Sizes) -> str:
    links = "; ".join(
        f"({name}) RTT {shape.rtt * 1000:.0f} ms, "
        + (f"{shape.bandwidth / 1e6:.0f} MB/s per connection" if shape.bandwidth else "no cap")
        for name, shape in profiles.items()
    )
    lines = [
        f"taskfs benchmark, links: {links}. {sizes.runs} run(s), medians ± half the spread; "
        f"rows without a link ran on ({next(iter(profiles))})",
        "",
        "| # | link | workload | taskfs | baselines | speed-up | CPU s/GiB | requests "
        "| bytes down | peak RSS | target | met |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def order(key: str) -> tuple[bool, int, str]:
        number = key[1:].split("-", maxsplit=1)[0].rstrip("abc")
        return key[0] != "P", int(number) if number.isdigit() else 0, key

    for key in sorted(bench.results, key=order):
        r = bench.results[key]
        base = "; ".join(f"{name}: {fmt(v, r.unit)}" for name, v in r.baselines.items()) or "-"
        requests = (
            ", ".join(
                f"{k}={v}"
                for k, v in r.requests.items()
                if k in ("storage_gets", "api_requests", "list_requests", "repeat_requests")
            )
            or "-"
        )
        notes = f" ({'; '.join(r.notes)})" if r.notes else ""
        met = "-" if r.ok is None else ("yes" if r.ok else "NO")
        lines.append(
            f"| {key} | {link_of(key)} | {r.workload}{notes} | {fmt(r.taskfs, r.unit)} | {base} "
            f"| {ratio(r)} | {fmt_cpu(r.cpu)} | {requests} "
            f"| {r.bytes_down / 1e6:.1f} MB | {r.peak_rss / 1e6:.0f} MB | {r.target} | {met} |"
        )
    if bench.floors:
        lines += [
            "",
            "CPU floors, measured in the same run (seconds of user + system CPU per GiB):",
            "",
            "| floor | CPU s/GiB |",
            "|---|---|",
            *(f"| {name} | {fmt_cpu(values)} |" for name, values in bench.floors.items()),
        ]
    return "\n".join(lines)


CHECKED = ("P1", "P2", "P6", "P10", "P12", "M1", "M2", "M3")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the reduced set (< 3 minutes)")
    parser.add_argument(
        "--check",
        action="store_true",
        help="fail unless the request counts (P1, P2, P6, P10, P12) and the memory of M1-M3 "
        "hold (never times)",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--runs", type=int, help="runs per workload (default: 3, quick 1)")
    parser.add_argument(
        "--profiles",
        help="link profiles to measure, of "
        + ", ".join(
            f"{k}: {v.rtt * 1000:.0f} ms RTT "
            + (f"{v.bandwidth / 1e6:.0f} MB/s" if v.bandwidth else "no cap")
            for k, v in PROFILES.items()
        )
        + " (default: abc; quick: a)",
    )
    parser.add_argument("--workdir", type=Path, help="keep state here (default: a temp dir)")
    parser.add_argument("--only", choices=["memory"], help="run only these rows (memory: M1-M3)")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    if args.runs:
        sizes = Sizes(**{**sizes.__dict__, "runs": args.runs})
    chosen = args.profiles or ("a" if args.quick else "abc")
    if not chosen or any(c not in PROFILES for c in chosen):
        parser.error(f"--profiles: letters of {''.join(PROFILES)}")
    profiles = {c: PROFILES[c] for c in dict.fromkeys(chosen)}
    work = args.workdir or Path(tempfile.mkdtemp(prefix="taskfs-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    service = start_service(work / "data")
    try:
        print("generating datasets ...", file=sys.stderr, flush=True)
        datasets = generate(service, sizes, work, memory_only=args.only == "memory")
        print(f"  done in {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
        with contextlib.ExitStack() as stack:
            # (a quick run checks no CPU: it leaves the machine's settings alone)
            held = not args.quick and stack.enter_context(page_reporting_held_off())
            proxies = {
                name: stack.enter_context(shaping_proxy(service.url, shape))
                for name, shape in profiles.items()
            }
            describe(service, proxies, datasets)
            bench = Bench(args, sizes, work)
            bench.env = {"INDUCTIVA_API_KEY": service.key}
            bench.run(service, proxies, datasets)
    finally:
        service.proc.send_signal(signal.SIGTERM)
        service.proc.wait(timeout=60)
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    table = report(bench, profiles, sizes)
    print(table)
    if held:
        print(
            "\n(free page reporting held off while measuring: CPU figures without the host's "
            "page reclaim, see page_reporting_held_off)"
        )
    print(f"\n(total {time.monotonic() - started:.0f} s)")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "profiles": {k: v.__dict__ for k, v in profiles.items()},
                    "sizes": sizes.__dict__,
                    "results": {k: r.__dict__ for k, r in bench.results.items()},
                },
                indent=2,
                default=str,
            )
        )
    if args.check:
        checked = [
            key
            for key in bench.results
            if any(key == c or (key.startswith(c) and not key[len(c)].isdigit()) for c in CHECKED)
            and (not args.only or key.startswith("M"))
        ]
        failed = [k for k in checked if not bench.results[k].counts_ok]
        if failed:
            print(f"request-count and memory checks failed: {', '.join(failed)}", file=sys.stderr)
            return 1
        print(f"request-count and memory checks passed: {', '.join(sorted(checked))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
