"""The page served on one origin and the API on another (the seed's layout: its page and its API on
different hosts), in Debian's Chromium: with the page's origin in the API's AGENTCHAT_CORS_ORIGINS the
live list, REST calls and their preflights work; without, the browser is refused both."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.processes import ServerProcess, free_port
from tests.e2e.test_web import agent, browser  # noqa: F401 (browser is a fixture)

pytestmark = pytest.mark.slow

# A POST with a JSON body (a preflight first), answered with the API's error envelope: the page can
# read it only if the preflight and the answer both allow its origin.
PREFLIGHTED_POST = """async (api) => {
  try {
    const response = await fetch(api + "/api/v1/peeks", {
      method: "POST", headers: {"Content-Type": "application/json"}, body: "{}"});
    return {status: response.status, code: (await response.json()).error.code};
  } catch (err) {
    return {failed: err.name};
  }
}"""


def _pair(tmp_path: Path, allow: bool) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    page_port = free_port()
    page_origin = f"http://127.0.0.1:{page_port}"
    api = ServerProcess(store=f"file://{tmp_path}/api", log_path=tmp_path / "api.log",
                        env={"AGENTCHAT_CORS_ORIGINS": page_origin} if allow else {}).start()
    try:
        page = ServerProcess(store=f"file://{tmp_path}/page", port=page_port, log_path=tmp_path / "page.log",
                             env={"AGENTCHAT_PUBLIC_API_URL": api.url}).start()
        try:
            yield api, page
        finally:
            page.close()
    finally:
        api.close()


@pytest.fixture
def allowed(tmp_path: Path) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    yield from _pair(tmp_path, allow=True)


@pytest.fixture
def refused(tmp_path: Path) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    yield from _pair(tmp_path, allow=False)


async def _open(browser: Any, page_server: ServerProcess) -> tuple[Any, list[str], list[str]]:  # noqa: F811
    context = await browser.new_context()
    page = await context.new_page()
    requests: list[str] = []
    errors: list[str] = []
    page.on("request", lambda request: requests.append(request.url))
    page.on("websocket", lambda socket: requests.append(socket.url))
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    await page.goto(page_server.url + "/")
    return page, requests, errors


async def test_a_listed_page_elsewhere_uses_the_api(allowed: tuple[ServerProcess, ServerProcess],
                                                    browser: Any) -> None:  # noqa: F811
    api, page_server = allowed
    page, requests, errors = await _open(browser, page_server)
    await page.get_by_text("Live: updates arrive").wait_for(state="attached")
    alice = await agent(api, "alice")
    try:
        channel = await alice.create_channel([], name="across origins")
        await page.locator(f'li[data-channel="{channel}"]').wait_for()  # the live list, from the API's socket
        assert await page.evaluate(PREFLIGHTED_POST, api.url) == {"status": 400, "code": "invalid_field"}
    finally:
        await alice.close()
    assert any(url.startswith(f"ws://127.0.0.1:{api.port}/api/v1/indicators/ws") for url in requests)
    assert not [url for url in requests if url.startswith(page_server.url + "/api/")], "the page asked its own host"
    assert not errors, errors


async def test_an_unlisted_page_elsewhere_is_refused(refused: tuple[ServerProcess, ServerProcess],
                                                     browser: Any) -> None:  # noqa: F811
    api, page_server = refused
    page, requests, errors = await _open(browser, page_server)
    await page.get_by_text("Connection lost; reconnecting").wait_for(state="attached")  # the upgrade got 403
    assert await page.evaluate(PREFLIGHTED_POST, api.url) == {"failed": "TypeError"}
    assert "Live: updates arrive" not in await page.inner_text("body")
