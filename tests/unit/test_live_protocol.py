"""The live channel's messages and the answering side's file operations, without WebRTC.

Oracles: ``str.splitlines``-style slicing of the file's own text for ``tail``, ``os.walk`` for
``ls``, ``json`` sizes for the message budget."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from taskfs.live import files, protocol
from taskfs.live.protocol import LiveProtocolError, TailArgs

TEXT = st.text(alphabet=st.sampled_from(["a", "é", "\n", "\n", "€", '"', "\\", "\x01"]))


def test_batches_fit_the_budget_and_keep_every_piece() -> None:
    lines = ['"\\' * 20_000, "é" * 30_000, "", *[f"line {i}" for i in range(20_000)]]
    sent = list(protocol.batches(lines))
    for batch in sent:
        assert len(protocol.lines_answer(batch).encode()) <= protocol.MESSAGE_BUDGET
    pieces = [piece for batch in sent for piece in batch]
    assert pieces == [p for line in lines for p in protocol.split_long(line)]
    assert "".join(protocol.split_long('"\\' * 20_000)) == '"\\' * 20_000
    # A peer that takes larger messages gets larger pieces and messages.
    for batch in protocol.batches(lines, 262_144 - 1024):
        assert len(protocol.lines_answer(batch).encode()) <= 262_144 - 1024
    assert next(protocol.batches(["x" * 40_000], 262_144 - 1024)) == ["x" * 40_000]
    long = "a" * 20_000 + "é" * 30_000  # 80 KB: one piece between aiortc peers
    assert list(protocol.split_long(long, 262_144 - 1024)) == [long]


@settings(max_examples=80, deadline=None)
@given(
    text=st.lists(
        st.one_of(
            TEXT, st.builds(lambda c, n: c * n, st.sampled_from('a€"\x01'), st.integers(0, 900))
        ),
        max_size=12,
    ).map("".join),
    budget=st.sampled_from([300, 700, 4_000, protocol.MESSAGE_BUDGET]),
)
def test_a_follower_rebuilds_the_text_of_cut_lines_byte_for_byte(text: str, budget: int) -> None:
    """Lines too long for one message go in pieces; the answers say which pieces continue, so
    that joining them gives the text itself, and every answer still fits the budget."""
    lines = text.split("\n")[:-1]  # the complete lines, as a followed tail sends them
    rebuilt = ""
    for batch in protocol.batches(lines, budget):
        raw = protocol.lines_answer(batch)
        assert len(raw.encode()) <= budget
        answer = protocol.parse_answer(raw)
        assert answer.message == batch  # what the official client reads is unchanged
        rebuilt += protocol.text_of(answer.message, answer.continued)
    assert rebuilt == text[: text.rfind("\n") + 1]


def test_an_answer_with_a_bad_list_of_continued_lines_is_refused() -> None:
    for bad in ('"x"', "[1.5]", '["1"]', "[true]"):
        with pytest.raises(LiveProtocolError, match="continued"):
            protocol.parse_answer(f'{{"status": "success", "message": [], "continued": {bad}}}')


def test_one_shot_answer_keeps_the_last_lines_that_fit() -> None:
    lines = [f"{i:06d}" + "x" * 100 for i in range(5000)]
    kept = protocol.last_fitting(lines)
    assert kept == lines[-len(kept) :]
    assert len(protocol.success(kept).encode()) <= protocol.MESSAGE_BUDGET
    assert len(kept) > 400


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"\xff", "not JSON"),
        ("[]", "JSON object"),
        ('{"type": "rm"}', "Unknown operation type: rm"),
        ('{"type": "ls", "follow": "yes"}', "follow"),
        ('{"type": "ls", "args": [1]}', "args"),
        ("x" * 20_000, "larger than"),
    ],
)
def test_bad_requests_say_what_is_wrong(raw: str | bytes, message: str) -> None:
    with pytest.raises(LiveProtocolError, match=message):
        protocol.parse_request(raw)


@pytest.mark.parametrize(
    "args",
    [{}, {"filename": ""}, {"filename": "x", "lines": -1}, {"filename": "x", "lines": True}],
)
def test_bad_tail_arguments(args: dict[str, object]) -> None:
    with pytest.raises(LiveProtocolError):
        protocol.tail_args(args)


def test_listing_paths_reads_the_nested_form_and_refuses_hostile_names() -> None:
    tree = ["a", {"d": ["b", {"e": []}]}, "c"]
    assert sorted(protocol.listing_paths(tree)) == [
        ("a", False),
        ("c", False),
        ("d", True),
        ("d/b", False),
        ("d/e", True),
    ]
    hostile: list[object] = [["../x"], ["a/b"], [{"..": []}], "x", [{"d": "x"}], [""], [None]]
    for bad in hostile:
        with pytest.raises(LiveProtocolError):
            protocol.listing_paths(bad)
    deep: list[object] = []
    for _ in range(protocol.MAX_DEPTH + 2):
        deep = [{"d": deep}]
    with pytest.raises(LiveProtocolError, match="deep"):
        protocol.listing_paths(deep)


def test_list_tree_matches_os_walk(tmp_path: Path) -> None:
    for rel in ("a/b/c.txt", "a/d.txt", "e.txt", "f/g/h/i.dat"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(rel)
    (tmp_path / "empty").mkdir()
    (tmp_path / "link").symlink_to("/etc")
    listed = set(protocol.listing_paths(files.list_tree(tmp_path)))
    walked = set()
    for top, dirs, names in os.walk(tmp_path):
        rel = os.path.relpath(top, tmp_path)
        prefix = "" if rel == "." else rel + "/"
        walked |= {(prefix + d, True) for d in dirs if not (Path(top) / d).is_symlink()}
        walked |= {(prefix + n, False) for n in names}
    walked.add(("link", False))  # a link is listed as a file, never entered
    assert listed == walked


def tail_text(root: Path, lines: int, follow: bool) -> list[str]:
    tail = files.Tail(root, TailArgs("f.txt", lines, False), follow)
    assert tail.open()
    try:
        return list(tail.initial())
    finally:
        tail.close()


@settings(max_examples=200, deadline=None)
@given(text=TEXT, lines=st.integers(0, 12), chunk=st.integers(1, 7))
def test_tail_initial_matches_the_text(
    tmp_path_factory: pytest.TempPathFactory, text: str, lines: int, chunk: int
) -> None:
    root = tmp_path_factory.mktemp("tail")
    (root / "f.txt").write_bytes(text.encode())
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(files, "CHUNK", chunk)  # every boundary case of the backward scan
        all_lines = text.split("\n")
        if all_lines[-1] == "":
            all_lines.pop()
        expected = all_lines[-lines:] if lines else []
        assert tail_text(root, lines, follow=False) == expected
        complete = text[: text.rfind("\n") + 1].split("\n")[:-1]
        assert tail_text(root, lines, follow=True) == (complete[-lines:] if lines else [])


@settings(max_examples=100, deadline=None)
@given(pieces=st.lists(TEXT, max_size=12))
def test_followed_appends_rebuild_the_file(
    tmp_path_factory: pytest.TempPathFactory, pieces: list[str]
) -> None:
    root = tmp_path_factory.mktemp("follow")
    path = root / "f.txt"
    path.write_bytes(b"")
    tail = files.Tail(root, TailArgs("f.txt", 10, False), follow=True)
    assert tail.open()
    got = list(tail.initial())
    written = b""
    with open(path, "ab", buffering=0) as out:
        for piece in pieces:
            data = piece.encode()
            # Cut inside a UTF-8 character too: the decoder carries the rest.
            for part in (data[: len(data) // 2], data[len(data) // 2 :]):
                out.write(part)
                written += part
                got += tail.appended()
    tail.close()
    text = written.decode()
    assert got == text[: text.rfind("\n") + 1].split("\n")[:-1]


@settings(max_examples=60, deadline=None)
@given(pieces=st.lists(TEXT, max_size=12), long_line=st.integers(1, 6))
def test_lines_longer_than_the_answering_side_holds_come_as_cut_pieces(
    tmp_path_factory: pytest.TempPathFactory, pieces: list[str], long_line: int
) -> None:
    """A line longer than ``LONG_LINE`` is sent in ``Cut`` pieces (bounded memory), which a
    follower joins into the file's text byte for byte."""
    root = tmp_path_factory.mktemp("long")
    path = root / "f.txt"
    path.write_bytes(b"")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(files, "LONG_LINE", long_line)
        tail = files.Tail(root, TailArgs("f.txt", 10, False), follow=True)
        assert tail.open()
        got = list(tail.initial())
        with open(path, "ab", buffering=0) as out:
            for piece in pieces:
                out.write(piece.encode())
                got += tail.appended()
        tail.close()
    text = "".join(pieces)
    cut = frozenset(i for i, line in enumerate(got) if isinstance(line, protocol.Cut))
    rebuilt = protocol.text_of(got, cut)
    assert text.startswith(rebuilt)  # all but the line being written, and some of it
    assert rebuilt.endswith("\n") or cut or not rebuilt
    assert text[len(rebuilt) :].count("\n") == 0


def test_a_followed_file_truncated_or_replaced_ends_the_stream(tmp_path: Path) -> None:
    path = tmp_path / "f.txt"
    for change in ("truncate", "rename"):
        path.write_text("one\ntwo\n")
        tail = files.Tail(tmp_path, TailArgs("f.txt", 10, False), follow=True)
        assert tail.open()
        assert list(tail.initial()) == ["one", "two"]
        if change == "truncate":
            path.write_text("new\n")  # shorter than what was read
        else:
            (tmp_path / "g.txt").write_text("one\ntwo\nthree and more\n")
            (tmp_path / "g.txt").rename(path)  # longer, but another file
        with pytest.raises(files.ReplacedError, match=r"truncated or replaced: f\.txt"):
            tail.appended()
        tail.close()


def test_a_burst_is_read_a_bounded_piece_at_a_time(tmp_path: Path) -> None:
    path = tmp_path / "f.txt"
    path.write_text("")
    tail = files.Tail(tmp_path, TailArgs("f.txt", 10, False), follow=True)
    assert tail.open()
    assert list(tail.initial()) == []
    path.write_text("".join(f"{i}\n" for i in range(100_000)) + "last")
    got: list[str] = []
    while True:
        piece = tail.appended(limit=4096)
        assert sum(len(x) + 1 for x in piece) <= 4096 + 8  # and the line it began in
        got += piece
        if not tail.behind():
            break
    assert got == [str(i) for i in range(100_000)]
    assert tail.rest() == ["last"] and tail.rest() == []
    tail.close()


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("../x", "Invalid file name"),
        ("/etc/passwd", "Invalid file name"),
        ("out", "Not a regular file"),
        ("escape", "outside"),
        ("fifo", "Not a regular file"),
    ],
)
def test_tail_refuses_what_is_not_a_file_of_the_task(
    tmp_path: Path, name: str, message: str
) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "escape").symlink_to("/etc/hostname")
    os.mkfifo(tmp_path / "fifo")
    tail = files.Tail(tmp_path, TailArgs(name, 10, False), follow=False)
    with pytest.raises(files.OperationError, match=message):
        tail.open()


def test_tail_of_binary_says_it_is_not_text(tmp_path: Path) -> None:
    (tmp_path / "f.txt").write_bytes(b"ok\n\xff\xfe\n")
    tail = files.Tail(tmp_path, TailArgs("f.txt", 10, False), follow=False)
    assert tail.open()
    with pytest.raises(files.OperationError, match=r"File is not a text file: f\.txt"):
        list(tail.initial())
    tail.close()


def test_answers_are_json_the_official_client_reads() -> None:
    assert json.loads(protocol.success(["a"])) == {"status": "success", "message": ["a"]}
    assert protocol.parse_answer(protocol.error("x")) == protocol.Answer(False, "x")
    with pytest.raises(LiveProtocolError):
        protocol.parse_answer('{"message": 1}')


def test_a_long_top_is_cut_to_fit_one_message() -> None:
    text = "".join(f'{pid:>7} root  20   0 {"x" * 60} "é"\n' for pid in range(5000))
    fitted = protocol.fit_text(text)
    assert len(protocol.success(fitted).encode()) <= protocol.MESSAGE_BUDGET
    kept = fitted.splitlines()
    assert kept[:-1] == text.splitlines()[: len(kept) - 1]
    assert kept[-1] == f"... ({5000 - len(kept) + 1} more lines)"
    assert protocol.fit_text("short\n") == "short\n"


def test_a_large_listing_is_cut_at_the_deepest_level_that_fits() -> None:
    tree: list[object] = [
        {f"d{i}": [{"sub": [f"f{j}.vtk" for j in range(300)]}]} for i in range(100)
    ]
    tree.append("stdout.txt")
    budget = 65_536
    fitted = protocol.fit_listing(tree, budget)
    assert len(protocol.success(fitted).encode()) <= budget
    paths = dict(protocol.listing_paths(fitted))
    assert paths["stdout.txt"] is False and paths["d99/sub"] is True
    assert "d0/sub/f0.vtk" not in paths  # the level that did not fit
    # Not even the top level fits: its first names.
    flat = [f"{i:05d}-{'x' * 50}" for i in range(5000)]
    fitted = protocol.fit_listing(flat, budget)
    assert len(protocol.success(fitted).encode()) <= budget
    assert fitted == flat[: len(fitted)] and len(fitted) > 500
    assert protocol.fit_listing(["a"], budget) == ["a"]


def test_listing_by_directory_has_every_parent() -> None:
    pytest.importorskip("aiortc")
    from taskfs.live.mirror import by_directory

    paths = [("a/b/c.txt", False), ("a", True), ("x", False), ("d/e", True)]
    assert by_directory(paths) == {
        "": {"a": True, "x": False, "d": True},
        "a": {"b": True},
        "a/b": {"c.txt": False},
        "d": {"e": True},
        "d/e": {},
    }
