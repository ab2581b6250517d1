"""Headless Chromium from Debian, driven through its chromedriver (selenium).

One browser per test, in a fresh profile directory, stopped by its own service's pid.
`canvas_stats` reads a viewport's pixels through the canvas's own `toDataURL` (the
page's origin is ours, so the canvas is not tainted) and returns what decides whether
it shows an image: how many distinct grey values and how far they spread.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from tests.interop.harness.tools import require_tools, unavailable

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
WINDOW = (1280, 900)
T = TypeVar("T")


def require_chromium() -> tuple[str, str]:
    """The two binaries, or a skip (a failure with CI=true) that says how to get them."""
    require_tools("chromium", "chromedriver")
    chromium = shutil.which("chromium") or CHROMIUM
    driver = shutil.which("chromedriver") or CHROMEDRIVER
    try:
        import selenium  # noqa: F401
    except ImportError:
        unavailable("selenium not installed: pip install -e '.[test]'")
    return chromium, driver


@contextmanager
def chromium(profile: Path, *, log: Path | None = None, args: Iterable[str] = ()) -> Iterator[Any]:
    """A headless Chromium (a selenium WebDriver); quit and its driver stopped at exit.
    `args`: more command-line flags (e.g. trusting a test server's key)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = require_chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in (
        "--headless=new",
        "--no-sandbox",  # root in a container: the sandbox needs user namespaces
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--use-gl=angle",
        "--use-angle=swiftshader",
        "--enable-unsafe-swiftshader",  # WebGL in software: cornerstone renders with it
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-background-networking",
        "--disable-extensions",
        "--disable-sync",
        "--metrics-recording-only",
        "--password-store=basic",
        f"--user-data-dir={profile}",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
    ):
        options.add_argument(arg)
    for arg in args:
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=driver_path, log_output=str(log) if log else None)
    driver = webdriver.Chrome(service=service, options=options)
    try:
        driver.set_page_load_timeout(60)
        driver.set_script_timeout(30)
        yield driver
    finally:
        driver.quit()


def wait_for(what: str, check: Callable[[], T | None], timeout: float, poll: float = 0.2) -> T:
    """Poll `check` until it returns something truthy; AssertionError naming `what`."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            value = check()
            if value:
                return value
        except Exception as exc:  # the page is changing under us; try again
            last_error = exc
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout:g} s waiting for {what}"
                + (f" (last error: {last_error})" if last_error else "")
            )
        time.sleep(poll)


# The RGBA pixels of the largest visible canvas (the viewport) as `data`, its size as `c`.
VIEWPORT_PIXELS_JS = """
const canvases = [...document.querySelectorAll('canvas')]
  .filter(c => c.width > 64 && c.height > 64 && c.offsetParent !== null);
if (!canvases.length) return null;
const c = canvases.reduce((a, b) => (a.width * a.height >= b.width * b.height ? a : b));
const copy = document.createElement('canvas');
copy.width = c.width; copy.height = c.height;
const ctx = copy.getContext('2d');
ctx.drawImage(c, 0, 0);
const data = ctx.getImageData(0, 0, c.width, c.height).data;
"""

CANVAS_STATS_JS = (
    VIEWPORT_PIXELS_JS
    + """
const seen = new Set(); let min = 255, max = 0;
for (let y = 0; y < c.height; y += 3) {
  for (let x = 0; x < c.width; x += 3) {
    const i = (y * c.width + x) * 4;
    const v = Math.round((data[i] + data[i + 1] + data[i + 2]) / 3);
    seen.add(v); if (v < min) min = v; if (v > max) max = v;
  }
}
return {distinct: seen.size, min: min, max: max, width: c.width, height: c.height};
"""
)


def canvas_stats(driver: Any) -> dict[str, int] | None:
    """Grey-level statistics of the largest visible canvas (the viewport), or None."""
    stats: dict[str, int] | None = driver.execute_script(CANVAS_STATS_JS)
    return stats


CANVAS_DIGEST_JS = (
    VIEWPORT_PIXELS_JS
    + """
let h = 0;
for (let i = 0; i < data.length; i += 4) { h = (h * 31 + data[i]) | 0; }
return h;
"""
)


def canvas_digest(driver: Any) -> int | None:
    """A hash of the viewport's pixels (to see that the image changed), or None."""
    digest: int | None = driver.execute_script(CANVAS_DIGEST_JS)
    return digest


def shows_an_image(stats: dict[str, int] | None) -> bool:
    """A CT slice has hundreds of grey levels over a wide range; a blank, a solid colour
    or a spinner does not."""
    return bool(stats) and stats["distinct"] >= 32 and stats["max"] - stats["min"] >= 64  # type: ignore[index]
