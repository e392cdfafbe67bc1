"""The chat page at / (server/ui): served files, `--no-ui`, and the page itself in headless
Chromium (the OS package, driven by Selenium) against a live server with a tiny random model."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from hearth.cli import build_parser, server_settings
from hearth.server.app import create_app
from hearth.server.registry import ModelRegistry
from hearth.server.settings import ServerSettings
from hearth.server.ui_route import FILES, UI_DIR
from tests.fixtures.fakes import FakeEngine
from tests.fixtures.server import (
    ROOT,
    build_tiny_checkpoint,
    running_server,
    thinking_config,
    tiny_config,
)

# --- fast: the files and the flag ---


def client(**settings: object) -> TestClient:
    registry = ModelRegistry()
    registry.add(FakeEngine(aliases=["fake"]))
    registry.mark_ready()
    return TestClient(create_app(registry, ServerSettings(**settings)))


def test_root_serves_the_page_and_its_files() -> None:
    http = client()
    page = http.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert "<title>hearth chat</title>" in page.text
    types = {"app.js": "text/javascript", "markdown.js": "text/javascript", "style.css": "text/css"}
    for name, kind in types.items():
        assert f"/ui/{name}" in page.text
        response = http.get(f"/ui/{name}")
        assert response.status_code == 200, name
        assert response.headers["content-type"] == f"{kind}; charset=utf-8"
        assert response.text == (UI_DIR / name).read_text()
    assert http.get("/ui/index.html").status_code == 200
    assert {path.name for path in UI_DIR.iterdir()} == set(FILES)  # each file is served
    assert http.get("/ui/nothing.js").status_code == 404
    assert http.get("/ui/../app.py").status_code == 404


def test_the_page_loads_nothing_from_elsewhere() -> None:
    """No CDN: every src/href in the page and every URL the script fetches is on this server."""
    for path in UI_DIR.iterdir():
        text = path.read_text()
        for url in re.findall(r"""(?:src|href)=["']([^"']+)""", text):
            assert url.startswith("/") or url in ("${href}",), (path.name, url)  # a link's own
        assert "@import" not in text and "url(http" not in text, path.name


def test_the_page_needs_no_key_but_the_api_does() -> None:
    http = client(api_keys=("secret",))
    assert http.get("/").status_code == 200
    assert http.get("/ui/app.js").status_code == 200
    assert http.get("/v1/models").status_code == 401


def test_no_ui_turns_it_off() -> None:
    http = client(ui=False)
    for path in ("/", "/ui/app.js", "/ui/style.css"):
        assert http.get(path).status_code == 404, path
    assert http.get("/v1/models").status_code == 200
    parser = build_parser()
    assert server_settings(parser.parse_args(["serve"]), ()).ui is True
    assert server_settings(parser.parse_args(["serve", "--no-ui"]), ()).ui is False


# --- slow: the page in a real browser ---


def find_chromium() -> tuple[str, str] | None:
    """(browser, driver) from the OS packages, or None."""
    browser = next(
        (p for n in ("chromium", "chromium-browser", "google-chrome") if (p := shutil.which(n))),
        None,
    )
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


def needs_chromium() -> None:
    if find_chromium() is None:
        pytest.skip(
            "no Chromium and chromedriver found (Debian/Ubuntu: apt-get install chromium "
            "chromium-driver; .ci/run installs them)"
        )
    pytest.importorskip("selenium", reason="selenium not installed (pip install -e '.[test]')")


@pytest.fixture(scope="module")
def long_tiny_dir(tmp_path_factory: pytest.TempPathFactory, smollm_tokenizer_dir: Path) -> Path:
    """The tiny random model with a long context: long answers, time to press stop."""
    out = build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-long"), smollm_tokenizer_dir)
    config = json.loads((out / "config.json").read_text())
    config["max_position_embeddings"] = 16384
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def browser():
    needs_chromium()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    path, driver_path = find_chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = path
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    options.add_argument("--window-size=1200,900")
    driver = webdriver.Chrome(options=options, service=Service(driver_path))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


# Where a failed browser test leaves its screenshot (CI keeps the folder as an artifact).
ARTIFACTS = Path(os.environ.get("HEARTH_TEST_ARTIFACTS", ROOT / "test-artifacts"))


@pytest.fixture(autouse=True)
def screenshot_on_failure(request: pytest.FixtureRequest) -> Iterator[None]:
    """A failed test that drove the browser saves what the page showed: ARTIFACTS/<test>.png."""
    yield
    report = getattr(request.node, "rep_call", None)
    if report is None or not report.failed or "browser" not in request.fixturenames:
        return
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{request.node.name}.png"
    request.getfixturevalue("browser").save_screenshot(str(path))
    print(f"screenshot of the failure: {path}")


def wait_for(condition, timeout: float = 60.0, what: str = "condition"):
    """Poll `condition()` until it returns something true; return that."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def open_page(driver, root: str, clear: bool = False) -> None:
    driver.get(root + "/")
    if clear:
        driver.execute_script("localStorage.clear()")
        driver.get(root + "/")


def model_options(driver) -> list[str]:
    return driver.execute_script("return [...document.querySelectorAll('#model option')]"
                                 ".map(o => o.value)")  # fmt: skip


def answers(driver) -> list[dict]:
    """Each assistant message: state, rendered text, reasoning text (and whether it is open)."""
    return driver.execute_script(
        """return [...document.querySelectorAll('.msg.assistant')].map(el => ({
            state: el.dataset.state,
            text: el.querySelector('.content').textContent,
            html: el.querySelector('.content').innerHTML,
            reasoning: el.querySelector('.reasoning-text').textContent,
            reasoningShown: !el.querySelector('details.reasoning').hidden,
            reasoningOpen: el.querySelector('details.reasoning').open,
            stats: el.querySelector('.stats').textContent,
            error: el.querySelector('.error').textContent}))"""
    )


def set_value(driver, element_id: str, value: str) -> None:
    element = driver.find_element("id", element_id)
    element.clear()
    element.send_keys(value)


def send(driver, text: str, max_tokens: int) -> int:
    """Type and send a message; return the index of its answer."""
    set_value(driver, "max_tokens", str(max_tokens))
    count = len(answers(driver))
    wait_for(lambda: driver.find_element("id", "send").is_enabled(), what="send enabled")
    driver.find_element("id", "input").send_keys(text)
    driver.find_element("id", "send").click()
    wait_for(lambda: len(answers(driver)) > count, what="an answer")
    return count


def grows(driver, index: int, times: int = 3) -> list[int]:
    """The answer's text lengths seen while it streams: growing, `times` different ones."""
    seen: list[int] = []

    def more() -> bool:
        answer = answers(driver)[index]
        assert answer["state"] == "streaming", answer
        size = len(answer["text"]) + len(answer["reasoning"])
        if size and (not seen or size > seen[-1]):
            seen.append(size)
        return len(seen) >= times

    wait_for(more, what="a streamed answer growing")
    return seen


def client_closed(root: str) -> float:
    page = httpx.get(root + "/metrics").text
    found = re.search(
        r'hearth_http_requests_total\{route="/v1/chat/completions",status="499"\} (\S+)', page
    )
    return float(found.group(1)) if found else 0.0


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, long_tiny_dir: Path) -> Iterator[str]:
    needs_chromium()
    config = tiny_config(tmp_path_factory.mktemp("ui") / "models.yaml", long_tiny_dir)
    with running_server("--config", str(config), "--autotune", "off") as (base_url, _):
        yield base_url.removesuffix("/v1")


@pytest.mark.slow
def test_chat_streams_stops_and_keeps_the_conversation(browser, served: str) -> None:
    open_page(browser, served, clear=True)
    wait_for(lambda: model_options(browser) == ["tiny"], what="the model list")

    # the Markdown renderer escapes HTML and highlights code
    html = browser.execute_script(
        "return HearthMarkdown.render('<img src=x onerror=alert(1)> **b**\\n```py\\n"
        "def f(): return 1\\n```')"
    )
    assert "<img" not in html and "&lt;img" in html and "<strong>b</strong>" in html
    assert '<span class="tok-kw">def</span>' in html and "<pre><code" in html

    # a streamed reply, growing, then done with its numbers
    first = send(browser, "Hello there", 400)
    grows(browser, first)
    done = wait_for(lambda: answers(browser)[first]["state"] == "done" and answers(browser)[first])
    assert done["text"] and not done["error"]
    assert "tok/s" in done["stats"] and re.search(r"\d+ completion", done["stats"]), done

    # a long one, stopped mid-stream with the stop button
    before = client_closed(served)
    second = send(browser, "Tell me a very long story", 12000)
    grows(browser, second)
    assert not browser.find_element("id", "send").is_enabled()
    browser.find_element("id", "stop").click()
    stopped = wait_for(
        lambda: answers(browser)[second]["state"] == "stopped" and answers(browser)[second],
        what="stopped",
    )
    assert stopped["text"] and "stopped" in stopped["stats"]
    time.sleep(1.0)
    assert answers(browser)[second]["text"] == stopped["text"]  # no longer growing
    assert not browser.find_element("id", "stop").is_enabled()
    wait_for(lambda: client_closed(served) > before, 30, "the server's 499 for the stopped one")

    # usable again: the next message is answered
    third = send(browser, "And now?", 8)
    wait_for(lambda: answers(browser)[third]["state"] == "done", what="third answer")
    kept = answers(browser)
    assert len(kept) == 3

    # a reload keeps the conversation (and the settings)
    browser.refresh()
    wait_for(lambda: model_options(browser) == ["tiny"], what="the model list after reload")
    reloaded = answers(browser)
    assert [a["text"] for a in reloaded] == [a["text"] for a in kept]
    assert [a["state"] for a in reloaded] == ["done", "stopped", "done"]
    users = [e.text for e in browser.find_elements("css selector", ".msg.user .content")]
    assert users == ["Hello there", "Tell me a very long story", "And now?"]
    assert browser.find_element("id", "max_tokens").get_attribute("value") == "8"

    # a new chat empties it
    browser.find_element("id", "new-chat").click()
    assert answers(browser) == []


@pytest.mark.slow
def test_api_key_field_and_folded_reasoning(browser, tmp_path: Path, tiny_llama_dir: Path) -> None:
    """With --api-key the page asks for the key; a thinking model's reasoning comes folded."""
    config = thinking_config(tmp_path / "models.yaml", tiny_llama_dir, "r1_distill_style")
    args = ("--config", str(config), "--autotune", "off", "--api-key", "s3cret")
    with running_server(*args) as (base_url, _):
        root = base_url.removesuffix("/v1")
        open_page(browser, root, clear=True)
        row = browser.find_element("id", "api-key-row")
        wait_for(row.is_displayed, what="the API key field")
        assert model_options(browser) == []
        set_value(browser, "api-key", "wrong")
        browser.find_element("id", "api-key-save").click()
        problem = browser.find_element("id", "models-error")
        wait_for(lambda: "refused" in problem.text, what="the refusal")
        set_value(browser, "api-key", "s3cret")
        browser.find_element("id", "api-key-save").click()
        wait_for(lambda: model_options(browser) == ["tiny"], what="models with the key")
        assert not problem.is_displayed()

        index = send(browser, "Think first", 24)
        answer = wait_for(
            lambda: answers(browser)[index]["state"] == "done" and answers(browser)[index],
            what="the answer",
        )
        assert not answer["error"]
        assert answer["reasoning"] and answer["reasoningShown"] and not answer["reasoningOpen"]
        assert browser.execute_script("return localStorage.getItem('hearth.apiKey')") == "s3cret"


@pytest.mark.slow
def test_no_ui_flag_live(tmp_path: Path, tiny_llama_dir: Path) -> None:
    config = tiny_config(tmp_path / "models.yaml", tiny_llama_dir)
    with running_server("--config", str(config), "--autotune", "off", "--no-ui") as (base, _):
        root = base.removesuffix("/v1")
        assert httpx.get(root + "/").status_code == 404
        assert httpx.get(root + "/ui/app.js").status_code == 404
        assert httpx.get(base + "/models").status_code == 200
