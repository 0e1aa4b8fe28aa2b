"""The real embedded service on 127.0.0.1:0, started in-process with ``nursery.start``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trio

from taskfs.api.client import ApiClient
from taskfs.config import ClientSettings, ServiceSettings
from taskfs.server.app import serve
from tests.support import Gate


@dataclass
class Service:
    url: str
    key: str
    settings: ServiceSettings
    gate: Gate

    @property
    def client_settings(self) -> ClientSettings:
        return ClientSettings(api_url=self.url, api_key=self.key, deadline=10.0)


async def start_service(
    nursery: trio.Nursery, data_dir: Path, *, slots: int = 2, kill_grace: float = 1.0
) -> Service:
    settings = ServiceSettings(
        data_dir=data_dir, port=0, slots=slots, kill_grace_seconds=kill_grace, vm_type="test-vm"
    )
    gate = Gate()
    url = await nursery.start(
        lambda task_status: serve(settings, runner_hook=gate, task_status=task_status)
    )
    key = settings.key_file.read_text().strip()
    return Service(url, key, settings, gate)


@pytest.fixture
async def service(nursery: trio.Nursery, tmp_path: Path) -> Service:
    return await start_service(nursery, tmp_path / "data")


@pytest.fixture
async def api(service: Service) -> AsyncIterator[ApiClient]:
    async with ApiClient.open(service.client_settings) as client:
        yield client


@pytest.fixture
async def http(service: Service) -> AsyncIterator[httpx.AsyncClient]:
    """A raw client with the key, for protocol-level checks."""
    async with httpx.AsyncClient(
        base_url=service.url, headers={"X-API-Key": service.key}, timeout=10
    ) as client:
        yield client
