"""Fixtures of the server tests (helpers live in `server_support`)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from server_support import API_KEY, Template, Workspace, build_template, copy_template


@pytest.fixture(scope="session")
def template(tmp_path_factory: pytest.TempPathFactory) -> Template:
    return build_template(tmp_path_factory.mktemp("template"))


@pytest.fixture
def workspace(template: Template, tmp_path: Path) -> Workspace:
    return copy_template(template, tmp_path)


@pytest.fixture
def client(workspace: Workspace) -> Iterator[Any]:
    from fastapi.testclient import TestClient

    from gradstore_server import create_app

    with TestClient(create_app(workspace.settings()), headers={"X-API-Key": API_KEY}) as c:
        yield c
