"""Drive the HTML sliders in headless Chromium, with the real mouse.

Debian's /usr/bin/chromium is used; Playwright never downloads a browser here.
Every request leaving the page's own origin is aborted and reported: the
sliders (and the book) must work offline.
"""
from __future__ import annotations


import pytest
import torch

from ddpm_tutorial.widgets import slider_html

from browser_support import CHROMIUM, launch, serve

SLIDER = "[data-ddpm-slider]"  # what ddpm_tutorial.widgets puts on each slider's root

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} is missing (apt-get install chromium)"),
]
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is missing")

# One JS call returns everything a check needs about one slider.
STATE = """r => {
  const input = r.querySelector("input[type=range]");
  return {src: r.querySelector("img").src, label: r.querySelector(".ddpm-slider-label").textContent,
          value: Number(input.value), disabled: input.disabled};
}"""


@pytest.fixture(scope="module")
def browser():
    yield from launch(sync_api)


class WatchedPage:
    """A page that records JS errors and aborts every request not under ``allowed``."""

    def __init__(self, browser, allowed: tuple[str, ...], **context_options):
        self.context = browser.new_context(**context_options)
        self.allowed = allowed + ("data:", "blob:")
        self.errors, self.outside = [], []
        self.context.route("**/*", self._route)
        self.page = self.context.new_page()
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(f"console: {m.text}"))
        self.page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))
        self.page.on("request", lambda r: r.url.startswith(self.allowed) or self.outside.append(r.url))

    def _route(self, route):
        route.continue_() if route.request.url.startswith(self.allowed) else route.abort()

    def check_clean(self):
        assert not self.outside, f"requests left the page's origin {self.allowed}: {self.outside}"
        assert not self.errors, f"JavaScript errors: {self.errors}"

    def close(self):
        self.context.close()


def drag(page, root, start: float, end: float, steps: int) -> list[dict]:
    """Press the mouse at fraction ``start`` of the slider's track, move to
    ``end`` in ``steps`` moves, release; returns the state after each move."""
    rng = root.locator("input[type=range]")
    # Centre it: scrolled to the top edge it could sit under the book's sticky header.
    rng.evaluate("el => el.scrollIntoView({block: 'center'})")
    box = rng.bounding_box()
    y, x0, x1 = box["y"] + box["height"] / 2, box["x"] + 1, box["x"] + box["width"] - 1
    page.mouse.move(x0 + (x1 - x0) * start, y)
    page.mouse.down()
    states = []
    for k in range(1, steps + 1):
        page.mouse.move(x0 + (x1 - x0) * (start + (end - start) * k / steps), y)
        states.append(root.evaluate(STATE))
    page.mouse.up()
    return states


def check_slider(page, root, name: str):
    """Drag one slider end to end and back, then press End / Home."""
    n = int(root.get_attribute("data-ddpm-slider"))
    first = root.evaluate(STATE)
    assert first["value"] == 0 and not first["disabled"], f"{name}: script did not enable the slider"
    forward = drag(page, root, 0, 1, steps=min(2 * n, 12))
    last = forward[-1]
    assert last["value"] == n - 1, f"{name}: dragging to the right end reached {last['value']}, not {n - 1}"
    if n > 1:
        assert last["src"] != first["src"], f"{name}: the image did not change"
        assert last["label"] != first["label"], f"{name}: the label did not change"
        seen = {(s["src"], s["label"]) for s in [first] + forward}
        assert len(seen) >= min(n, 3), f"{name}: only {len(seen)} frames shown while dragging"
    back = drag(page, root, 1, 0, steps=3)[-1]
    assert back == first, f"{name}: dragging back did not restore frame 0: {back['label']}"
    rng = root.locator("input[type=range]")
    rng.press("End")
    assert root.evaluate(STATE) == last, f"{name}: End key did not show the last frame"
    rng.press("Home")
    assert root.evaluate(STATE) == first, f"{name}: Home key did not show frame 0"


def frames(n, size):
    return torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(n))


def test_two_sliders_on_a_page(browser, tmp_path):
    body = (slider_html(frames(6, 28), [f"t = {t}" for t in range(6)], title="first")
            + slider_html(frames(3, 16), ["a", "b", "c"]))
    page_file = tmp_path / "page.html"
    page_file.write_text(f'<!doctype html><html><head><meta charset="utf-8"></head><body>{body}</body></html>')
    watched = WatchedPage(browser, allowed=(page_file.as_uri(),))
    try:
        page = watched.page
        page.goto(page_file.as_uri())
        roots = page.locator(SLIDER).all()
        assert len(roots) == 2
        other_before = roots[1].evaluate(STATE)
        check_slider(page, roots[0], "slider 1")
        assert roots[1].evaluate(STATE) == other_before, "moving slider 1 changed slider 2"
        check_slider(page, roots[1], "slider 2")
        watched.check_clean()
    finally:
        watched.close()


def test_frame_zero_shows_without_javascript(browser, tmp_path):
    page_file = tmp_path / "page.html"
    page_file.write_text(slider_html(frames(4, 28), ["t = 0", "t = 1", "t = 2", "t = 3"]))
    watched = WatchedPage(browser, allowed=(page_file.as_uri(),), java_script_enabled=False)
    try:
        watched.page.goto(page_file.as_uri())
        root = watched.page.locator(SLIDER)
        assert root.locator("img").evaluate("i => i.complete && i.naturalWidth") == 28
        assert root.locator(".ddpm-slider-label").inner_text() == "t = 0"
        assert root.locator("input").is_disabled(), "without scripts the slider should look inert"
        watched.check_clean()
    finally:
        watched.close()


def test_book_sliders(built_book, browser):
    """Every slider of every chapter page of the built book moves, offline."""
    pages = [p for p in sorted(built_book.glob("notebooks/*.html")) if "data-ddpm-slider" in p.read_text()]
    shots = built_book.parent / "screenshots"
    shots.mkdir(exist_ok=True)
    n_sliders = 0
    with serve(built_book) as base:
        for path in pages:
            watched = WatchedPage(browser, allowed=(base + "/",))
            try:
                page = watched.page
                page.goto(f"{base}/notebooks/{path.name}")
                roots = page.locator(SLIDER).all()
                for k, root in enumerate(roots):
                    check_slider(page, root, f"{path.name}, slider {k + 1}")
                if roots:  # screenshot with the first slider half-way
                    n = int(roots[0].get_attribute("data-ddpm-slider"))
                    middle = drag(page, roots[0], 0, 0.5, steps=1)[-1]
                    assert n < 3 or 0 < middle["value"] < n - 1
                    page.screenshot(path=str(shots / f"{path.stem}.png"))
                n_sliders += len(roots)
                watched.check_clean()
            finally:
                watched.close()
    assert n_sliders, (f"no chapter page in {built_book / 'notebooks'} shows a slider "
                       f"(an element with data-ddpm-slider); the chapters should have timestep sliders")
