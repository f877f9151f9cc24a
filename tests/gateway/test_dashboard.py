"""The fleet dashboard in headless Chromium, against the session's gateway and fleet.

The page is driven by Selenium with Debian's ``chromium`` and ``chromedriver`` (the
``browser`` fixture of ``tests/conftest.py``). Every wait is bounded.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import requests

from app.bench.harness import LocalFleet, wait_until
from app.gateway.dashboard import RateMeter
from tasks import infer
from tests.gateway.conftest import Gateway

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.by import By  # noqa: E402

pytestmark = pytest.mark.fleet

MODEL = "llama3.2:3b"
#: The README's picture of the dashboard, retaken when CORRAL_UPDATE_DOCS=1.
DOCS_SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "dashboard.png"


def _text(driver: webdriver.Chrome, css: str) -> str:
    found = driver.find_elements(By.CSS_SELECTOR, css)
    return found[0].text if found else ""


def _number(driver: webdriver.Chrome, css: str) -> float:
    """The first number in an element's text (``"3 / 6"`` is 3); -1 if there is none yet."""
    head = _text(driver, css).split(" ")[0].replace(",", "")
    try:
        return float(head)
    except ValueError:
        return -1.0


def _page_until(
    driver: webdriver.Chrome, check: Callable[[], object], timeout: float, what: str
) -> object:
    try:
        return wait_until(check, timeout, what, every=0.2)
    except TimeoutError:
        body = driver.find_element(By.TAG_NAME, "body").text
        raise AssertionError(f"the page never showed {what}; it shows:\n{body}") from None


def _screenshot(driver: webdriver.Chrome, *paths: Path) -> None:
    """The whole page and no more: the window is first made as tall as the page."""
    chrome = driver.get_window_size()["height"] - driver.execute_script("return innerHeight")
    page = driver.execute_script("return Math.ceil(document.body.getBoundingClientRect().bottom)")
    driver.set_window_size(driver.get_window_size()["width"], page + chrome)
    for path in paths:
        driver.save_screenshot(str(path))


def _instances_shown(driver: webdriver.Chrome, fleet: LocalFleet) -> bool:
    counts = [_text(driver, f'#instances tr[data-key="{n}"] .count') for n in fleet.sim_urls]
    return all(c.endswith("/ 2") for c in counts)


def test_rates_span_the_window_and_ignore_resets() -> None:
    meter = RateMeter(window=5)
    assert meter.rates(0, {"a": 0}) == {"a": 0.0}
    assert meter.rates(2, {"a": 4, "b": 7}) == {"a": 2.0, "b": 0.0}  # b is new: no rate yet
    assert meter.rates(10, {"a": 20, "b": 3}) == {"a": 2.0, "b": 0.0}  # over 2..10; b reset


def test_page_is_public_and_data_needs_a_key(gateway: Gateway, healthy_fleet: LocalFleet) -> None:
    page = requests.get(gateway.url + "/dashboard", timeout=10)
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert 'data-tier="interactive"' in page.text
    assert not re.search(r'(src|href)="(https?:)?//', page.text), "all in the page"
    assert requests.get(gateway.url + "/dashboard/data", timeout=10).status_code == 401
    data = requests.get(gateway.url + "/dashboard/data", headers=gateway.auth(), timeout=10)
    assert data.status_code == 200
    shown = {i["name"]: i for i in data.json()["instances"]}
    assert set(healthy_fleet.sim_urls) <= set(shown)
    assert all(shown[n]["capacity"] == 2 for n in healthy_fleet.sim_urls)
    queues = {q["model"]: q for q in data.json()["queues"]}
    assert set(queues[MODEL]["ready"]) == {"interactive", "normal", "batch"}


def test_page_asks_for_a_key_then_shows_the_fleet(
    gateway: Gateway, healthy_fleet: LocalFleet, browser: webdriver.Chrome
) -> None:
    browser.get(gateway.url + "/dashboard")
    browser.execute_script("localStorage.clear()")
    browser.get(gateway.url + "/dashboard")
    form = browser.find_element(By.ID, "keyform")
    _page_until(browser, form.is_displayed, 10, "the key form")
    browser.find_element(By.ID, "key").send_keys("not-a-key")
    form.submit()
    _page_until(browser, lambda: "refused" in _text(browser, "#notice"), 10, "the key refused")
    browser.find_element(By.ID, "key").clear()
    browser.find_element(By.ID, "key").send_keys(gateway.key)
    form.submit()
    _page_until(browser, lambda: _instances_shown(browser, healthy_fleet), 15, "the instances")
    assert not form.is_displayed() and not browser.find_element(By.ID, "notice").is_displayed()


def test_failed_attempts_are_listed(
    gateway: Gateway, healthy_fleet: LocalFleet, browser: webdriver.Chrome
) -> None:
    browser.get(f"{gateway.url}/dashboard#key={gateway.key}")
    healthy_fleet.faults("sim-c", error_rate=1.0)
    jobs = [infer.delay(model=MODEL, prompt=f"fail {i}", cache=False) for i in range(9)]
    assert all(j.get(timeout=60).routing.instance != "sim-c" for j in jobs)
    row = "#failures tr[data-key]:not(.empty)"
    _page_until(
        browser,
        lambda: "sim-c" in _text(browser, row) and "retried" in _text(browser, row),
        15,
        "sim-c's failed attempts",
    )
    assert "InstanceFailed" in _text(browser, row)


def test_page_follows_a_burst_of_jobs_live(
    gateway: Gateway, healthy_fleet: LocalFleet, browser: webdriver.Chrome, tmp_path: Path
) -> None:
    # A page of its own: the browser still shows the previous test's /dashboard, and a link
    # that differs from it only by its #fragment would not reload it (the page takes the key
    # from the fragment in place), leaving figures read while that test's jobs still ran.
    browser.get("about:blank")
    browser.get(f"{gateway.url}/dashboard#key={gateway.key}")
    _page_until(browser, lambda: _instances_shown(browser, healthy_fleet), 15, "the instances")
    assert "key" not in browser.current_url, "the key stays in the address bar"
    # healthy_fleet saw no slot held; a read of the fleet is served for up to FRESH_FOR and
    # the page polls every second, so the page says so within a few seconds.
    _page_until(browser, lambda: _number(browser, "#slots-used") == 0, 5, "no slot in use")
    # Set in this page's window: still there at the end means the page never reloaded.
    browser.execute_script("window.sameDocument = true")

    for name in healthy_fleet.sim_urls:
        healthy_fleet.faults(name, slow_factor=60.0)  # ~1 s a job: 6 slots for 48 jobs
    jobs = [
        infer.delay(model=MODEL, prompt=f"burst {i}", tier=("normal", "batch")[i % 2], cache=False)
        for i in range(48)
    ]
    seen = {"slots": 0.0, "queued": 0.0, "waiting": 0.0, "rate": 0.0}

    def busy() -> bool:
        for name, css in (
            ("slots", "#slots-used"),
            ("queued", "#queued"),
            ("waiting", "#waiting"),
            ("rate", "#jobs-rate"),
        ):
            seen[name] = max(seen[name], _number(browser, css))
        return all(value > 0 for value in seen.values())

    _page_until(browser, busy, 30, "slots in use, queued jobs and a rate")
    per_instance = [
        _number(browser, f'#instances tr[data-key="{n}"] .count') for n in healthy_fleet.sim_urls
    ]
    assert all(0 <= used <= 2 for used in per_instance), per_instance
    time.sleep(1.5)  # a frame with every column moving, for the picture
    shots = [tmp_path / "dashboard.png"]
    if os.environ.get("CORRAL_UPDATE_DOCS") == "1":
        shots.append(DOCS_SCREENSHOT)
    _screenshot(browser, *shots)
    assert shots[0].stat().st_size > 10_000

    for name in healthy_fleet.sim_urls:
        healthy_fleet.faults(name, slow_factor=1.0)
    assert all(j.get(timeout=90).text for j in jobs)
    _page_until(
        browser,
        lambda: (
            _number(browser, "#slots-used") == 0
            and _number(browser, "#queued") == 0
            and _number(browser, "#waiting") == 0
        ),
        20,
        "the fleet idle again",
    )
    assert browser.execute_script("return window.sameDocument") is True
    assert browser.find_element(By.ID, "live").text.startswith("live")


def test_data_shows_the_placement_plan(gateway: Gateway, healthy_fleet: LocalFleet) -> None:
    """Routers keep the plan they route by where the dashboard reads it: each instance's
    models as the plan wants them held (issue 16)."""
    for i in range(3):
        infer.delay(model=MODEL, prompt=f"plan {i}", cache=False).get(timeout=60)

    def planned() -> dict[str, list[str] | None]:
        data = requests.get(gateway.url + "/dashboard/data", headers=gateway.auth(), timeout=10)
        return {i["name"]: i["planned"] for i in data.json()["instances"]}

    def complete() -> dict[str, list[str] | None] | None:
        now = planned()
        return now if all(now.get(n) is not None for n in healthy_fleet.sim_urls) else None

    shown = wait_until(complete, 10, "the plan on the dashboard")
    assert any(MODEL in (shown[n] or []) for n in healthy_fleet.sim_urls), shown
