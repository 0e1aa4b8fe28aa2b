"""Fixtures for every test layer.

* Any log record at WARNING or above fails the test that produced it, unless the test is marked
  ``expected_warnings`` (and then it should assert on the records it expects).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "expected_warnings: the test expects WARNING+ log records (and checks them)"
    )


@pytest.fixture(autouse=True)
def _no_unexpected_warnings(
    request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture
) -> Iterator[None]:
    yield
    if request.node.get_closest_marker("expected_warnings"):
        return
    records = [
        r
        for phase in ("setup", "call")
        for r in caplog.get_records(phase)
        if r.levelno >= logging.WARNING
    ]
    if records:
        lines = "\n".join(f"{r.levelname} {r.name}: {r.getMessage()}" for r in records)
        pytest.fail(f"unexpected log records at WARNING or above:\n{lines}")
