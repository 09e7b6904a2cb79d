"""The WebSocket layer's tests run on asyncio's event loop and on uvloop, the one ``agentchat serve``
uses: their transports differ in details the layer relies on (``set_protocol``, flow control, pausing
reads)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any

import pytest
import uvloop


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> Mapping[str, Callable[[], Any]]:
    return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
