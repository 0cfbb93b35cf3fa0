"""The "Try it" page (book/try_it.md) in headless Chromium: the shipped class-conditional
network generating Fashion-MNIST samples in the browser, with ONNX Runtime Web on WebAssembly.

The built site is served on 127.0.0.1 and every other request is aborted. Checks: pressing
Generate draws images; different seeds give different images; the JavaScript DDIM sampler with
classifier-free guidance agrees with ``ddpm_tutorial.sampling.ddim_sample`` on the same x_T,
noise, class and w to 1e-3; asking for "Sneaker" at w = 3 draws sneakers by the book's own
classifier; the step slider goes back through the run; nothing heavy loads before the press;
no console errors; without the runtime the page shows a note.
Debian's /usr/bin/chromium is used; Playwright never downloads a browser.
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ddpm_tutorial.checkpoint import model_from_checkpoint, shipped_checkpoint_path
from ddpm_tutorial.data import CLASSES
from ddpm_tutorial.export import DEMO_CHECKPOINT
from ddpm_tutorial.metrics import load_classifier
from ddpm_tutorial.sampling import ddim_sample

from browser_support import CHROMIUM, launch, serve

PAGE = "book/try_it.html"
N = 8   # images per batch on the page
SNEAKER = CLASSES.index("Sneaker")

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} is missing (apt-get install chromium)"),
]
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is missing")


@pytest.fixture(scope="module")
def site(built_book):
    """(html dir, base URL, manifest). Fails, rather than skips, when npm is on this machine
    but the build has no runtime: `make test` runs `npm ci` before it builds the book."""
    manifest_path = built_book / "_static" / "demo" / "manifest.json"
    assert manifest_path.is_file(), (f"{manifest_path} is missing: the book build did not run the "
                                     "ddpm_demo extension (_config.yml, sphinx.local_extensions)")
    manifest = json.loads(manifest_path.read_text())
    if not manifest["ready"]:
        reasons = " ".join(p["missing"] for p in (manifest["model"], manifest["runtime"]) if "missing" in p)
        if "missing" in manifest["runtime"] and not shutil.which("npm") and "missing" not in manifest["model"]:
            pytest.skip(f"npm is missing, so the book was built without ONNX Runtime Web: {reasons}")
        pytest.fail(f"the built book's demo is not ready although it could be: {reasons}")
    with serve(built_book) as base:
        yield built_book, base, manifest


@pytest.fixture(scope="module")
def browser():
    yield from launch(sync_api)


class DemoPage:
    """The Try-it page in a fresh context: records console errors, page errors and every
    request; aborts requests that leave the local server."""

    def __init__(self, browser, base: str):
        self.base = base
        self.context = browser.new_context()
        self.errors, self.outside, self.requested = [], [], []
        self.context.route("**/*", self._route)
        self.page = self.context.new_page()
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(f"console: {m.text}"))
        self.page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))
        self.page.on("request", lambda r: self.requested.append(r.url))

    def _route(self, route):
        url = route.request.url
        if url.startswith((self.base + "/", "data:", "blob:")):
            route.continue_()
        else:
            self.outside.append(url)
            route.abort()

    def open(self, state: str = "ready"):
        self.page.goto(f"{self.base}/{PAGE}")
        self.page.wait_for_selector(f"#ddpm-demo[data-state={state}]", timeout=30_000)

    def set(self, name: str, value) -> None:
        """Set a control as a reader would leave it (value + input event)."""
        self.page.locator(f'#ddpm-demo [name="{name}"]').evaluate(
            "(el, v) => { el.value = v; el.dispatchEvent(new Event('input', {bubbles: true})); }", str(value))

    def choose_class(self, name: str) -> None:
        """Pick a class by its visible name ("any (unconditional)", "Sneaker", ...)."""
        self.page.locator('#ddpm-demo [name="class"]').select_option(label=name)

    def generate(self, seed: int, steps: int = 10, eta: float = 0.0, cls: str | None = None,
                 w: float | None = None) -> dict:
        if cls is not None:
            self.choose_class(cls)
        if w is not None:
            self.set("guidance", w)
        self.set("seed", seed)
        self.set("steps", steps)
        self.set("eta", eta)
        self.page.locator('#ddpm-demo [name="generate"]').click()
        self.page.wait_for_selector("#ddpm-demo[data-state=done]", timeout=180_000)
        run = self.page.evaluate("() => window.ddpmDemo.lastRun")
        self.page.evaluate("() => { document.getElementById('ddpm-demo').dataset.state = 'ready'; }")
        return run

    def check_clean(self):
        assert not self.outside, f"requests left 127.0.0.1: {self.outside}"
        assert not self.errors, f"JavaScript errors: {self.errors}"

    def close(self):
        self.context.close()


@pytest.fixture(scope="module")
def cond_model():
    """The network the page runs (chapter 8's class-conditional one), in PyTorch."""
    model, schedule, _ = model_from_checkpoint(shipped_checkpoint_path(DEMO_CHECKPOINT))
    return model, schedule


@pytest.fixture
def demo(site, browser):
    _, base, _ = site
    page = DemoPage(browser, base)
    yield page
    page.close()


def canvas_pixels(page, selector: str) -> np.ndarray:
    """The gray values (0-255) a canvas shows, (H, W)."""
    data = page.locator(selector).evaluate(
        "c => { const d = c.getContext('2d').getImageData(0, 0, c.width, c.height);"
        " return {w: c.width, h: c.height, px: Array.from(d.data.filter((_, i) => i % 4 === 0))}; }")
    return np.asarray(data["px"], dtype=np.float32).reshape(data["h"], data["w"])


def test_generate_shows_images(demo, site):
    """The reader's path: nothing heavy before the press; Generate draws 8 garments, not noise;
    then the step slider goes back through the run."""
    html, _, manifest = site
    demo.open()
    status = demo.page.locator("#ddpm-demo .ddpm-demo-status").inner_text()
    assert f"{manifest['page_weight_bytes'] / 1e6:.1f} MB" in status, status
    heavy = [u for u in demo.requested if u.endswith((".wasm", ".onnx", "ort.wasm.min.js"))]
    assert not heavy, f"the page loaded the runtime or model before Generate was pressed: {heavy}"

    assert demo.page.evaluate("() => self.crossOriginIsolated") is False  # a plain static host
    run = demo.generate(seed=0, steps=25)
    assert len(run["stepMs"]) == 25
    images = np.asarray(run["images"], dtype=np.float32).reshape(N, 28, 28)
    assert np.isfinite(images).all() and images.min() >= -1 and images.max() <= 1
    # Fashion-MNIST is garments on a black background: most border pixels near -1, unlike noise.
    border = np.concatenate([images[:, :2].ravel(), images[:, -2:].ravel()])
    assert (border < -0.8).mean() > 0.7, f"the border is not black: mean {border.mean():.2f}"
    assert images.reshape(N, -1).std(axis=1).min() > 0.2, "some image is flat"

    shown = canvas_pixels(demo.page, "#ddpm-demo canvas.ddpm-demo-xt")
    assert shown.shape == (28, N * 28)
    expected = np.clip(np.round((images + 1) * 127.5), 0, 255)
    expected = expected.transpose(1, 0, 2).reshape(28, N * 28)        # 8 images side by side
    assert np.abs(shown - expected).max() <= 1, "the canvas does not show the final images"
    assert canvas_pixels(demo.page, "#ddpm-demo canvas.ddpm-demo-x0").std() > 20
    assert "ms per step" in demo.page.locator("#ddpm-demo .ddpm-demo-status").inner_text()
    assert run["y"] is None and run["w"] == 0, "the page starts on 'any' (the unconditional model)"
    shots = html.parent / "screenshots"
    shots.mkdir(exist_ok=True)
    demo.page.locator("#ddpm-demo").screenshot(path=str(shots / "try_it.png"))
    check_step_slider(demo, run, shown)
    demo.check_clean()


def check_step_slider(demo, run: dict, end_xt: np.ndarray) -> None:
    """After a run the step slider scrubs the recorded x_t and x0_hat: frame 0 is x_T (noise)
    at t = 999, the last frame the samples; the keyboard moves it as a mouse would."""
    steps = len(run["stepMs"])
    scrub = demo.page.locator('#ddpm-demo [name="scrub"]')
    label = demo.page.locator('#ddpm-demo [name="scrub-out"]')
    assert not scrub.is_disabled() and scrub.get_attribute("max") == str(steps)
    assert scrub.input_value() == str(steps) and "samples" in label.inner_text()
    assert run["timesteps"][0] == 999 and len(run["timesteps"]) == steps
    end_x0 = canvas_pixels(demo.page, "#ddpm-demo canvas.ddpm-demo-x0")
    scrub.press("Home")
    assert "t = 999" in label.inner_text(), label.inner_text()
    start_xt = canvas_pixels(demo.page, "#ddpm-demo canvas.ddpm-demo-xt")
    start_x0 = canvas_pixels(demo.page, "#ddpm-demo canvas.ddpm-demo-x0")
    # x_T is N(0, I) noise: no black garment border, and far from the samples
    assert (start_xt[:2] < 10).mean() < 0.5, "frame 0 should show x_T, pure noise"
    assert np.abs(start_xt - end_xt).mean() > 30 and np.abs(start_x0 - end_x0).mean() > 5
    seen = set()
    for _ in range(steps):
        scrub.press("ArrowRight")
        seen.add(label.inner_text())
    assert len(seen) == steps, f"{steps} presses showed {len(seen)} different frames"
    assert np.array_equal(canvas_pixels(demo.page, "#ddpm-demo canvas.ddpm-demo-xt"), end_xt), \
        "the last frame should show the samples again"


def test_guidance_slider_needs_a_class(demo):
    """w means nothing without a class: disabled on 'any', enabled once a class is picked;
    every Fashion-MNIST class is offered."""
    demo.open()
    options = demo.page.locator('#ddpm-demo [name="class"] option').all_inner_texts()
    assert options == ["any (unconditional)", *CLASSES]
    guidance = demo.page.locator('#ddpm-demo [name="guidance"]')
    assert guidance.is_disabled()
    assert (guidance.get_attribute("min"), guidance.get_attribute("max")) == ("0", "5")
    demo.choose_class("Bag")
    assert not guidance.is_disabled()
    demo.choose_class("any (unconditional)")
    assert guidance.is_disabled()
    # the sampler refuses what Python's refuses, with a message
    errors = demo.page.evaluate("""async () => {
        const xT = new Array(784).fill(0), out = [];
        for (const req of [{y: null, w: 2}, {y: 10, w: 1}, {y: 1.5, w: 0}, {y: 3, w: -1}])
          try { await window.ddpmDemo.sample({xT, steps: 10, ...req}); out.push("accepted"); }
          catch (e) { out.push(e.message); }
        return out; }""")
    assert "accepted" not in errors, errors
    assert "needs a class" in errors[0] and "[0, 10)" in errors[1] and "w must be" in errors[3]
    demo.check_clean()


def test_asking_for_a_sneaker(demo):
    """The reader's request: class "Sneaker" at w = 3, 20 DDIM steps, three seeds. The book's
    own classifier (ddpm_tutorial.metrics) calls at least 7 of each run's 8 images a sneaker;
    each guided step sends 16 images (8 with the class, 8 with the null class) through the
    network in one call."""
    classifier = load_classifier()
    demo.open()
    start, step_ms = time.perf_counter(), []
    for seed in (1, 2, 3):
        run = demo.generate(seed=seed, steps=20, cls="Sneaker", w=3)
        step_ms += run["stepMs"]
        assert (run["y"], run["w"]) == (SNEAKER, 3)
        images = torch.tensor(run["images"], dtype=torch.float32).reshape(N, 1, 28, 28)
        with torch.no_grad():
            predicted = classifier(images).argmax(1).tolist()
        named = [CLASSES[k] for k in predicted]
        assert named.count("Sneaker") >= 7, f"seed {seed}: asked for sneakers, the classifier sees {named}"
    status = demo.page.locator("#ddpm-demo .ddpm-demo-status").inner_text()
    assert "Sneaker, w = 3.0" in status and f"all {2 * N} at once" in status, status
    print(f"\nthree guided runs of 20 steps in {time.perf_counter() - start:.1f} s (model load included); "
          f"ms per guided step: median {statistics.median(step_ms):.0f}, fastest {min(step_ms):.0f}; "
          f"load average {os.getloadavg()[0]:.1f}")
    demo.check_clean()


def test_seeds_give_different_images(demo):
    demo.open()
    a = np.asarray(demo.generate(seed=1)["images"])
    b = np.asarray(demo.generate(seed=2)["images"])
    a_again = np.asarray(demo.generate(seed=1)["images"])
    assert np.abs(a - b).mean() > 0.1, "seeds 1 and 2 gave (nearly) the same images"
    np.testing.assert_array_equal(a, a_again, err_msg="the same seed gave different images")
    demo.check_clean()


# (class, w, eta): the unconditional model (the null class), guidance, guidance with fresh noise
# at every step, and a class without guidance (one network call on the class alone).
PARITY = [(None, 0.0, 0.0), (SNEAKER, 3.0, 0.0), (CLASSES.index("Bag"), 1.5, 1.0), (CLASSES.index("Dress"), 0.0, 0.0)]


def test_js_sampler_matches_python(demo, cond_model):
    """The same x_T, per-step noise, class and w into ddim_sample (PyTorch, guided_eps) and the
    page's sampler (ONNX Runtime Web + the JavaScript guidance and DDIM step): the images
    agree to 1e-3 for each request of PARITY (one page, so the runtime loads once)."""
    steps = 10
    model, schedule = cond_model
    demo.open()
    for k, (cls, w, eta) in enumerate(PARITY):
        seed = 123 + k
        # ddim_sample draws x_T first, then one z per step (when eta > 0), from its generator:
        # drawing the same way from the same seed gives the test vector for the browser.
        g = torch.Generator().manual_seed(seed)
        x_T = torch.randn(N, 1, 28, 28, generator=g)
        noises = [torch.randn(N, 1, 28, 28, generator=g) for _ in range(steps)]
        expected = ddim_sample(model, schedule, n=N, steps=steps, eta=eta, progress=False, y=cls, guidance=w,
                               generator=torch.Generator().manual_seed(seed)).images.numpy()
        got = demo.page.evaluate(
            """async ({xT, noises, steps, eta, y, w}) => {
                 const r = await window.ddpmDemo.sample({xT, noises, steps, eta, y, w});
                 return Array.from(r.images);
               }""",
            {"xT": x_T.flatten().tolist(), "noises": [z.flatten().tolist() for z in noises] if eta else None,
             "steps": steps, "eta": eta, "y": cls, "w": w})
        got = np.asarray(got, dtype=np.float32).reshape(N, 1, 28, 28)
        name = "any" if cls is None else CLASSES[cls]
        print(f"\n{name}, w = {w}, eta = {eta}: max |JavaScript - Python| = {np.abs(got - expected).max():.2e}")
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-3, err_msg=f"class {name}, w = {w}, eta = {eta}")
    demo.check_clean()


def test_page_states_the_built_weight(site):
    """The sizes typed on the page (book/try_it.md) are those of the files the build shipped."""
    _, _, manifest = site
    text = (Path(__file__).resolve().parents[1] / "book" / "try_it.md").read_text()
    runtime, model = manifest["runtime"], manifest["model"]["files"]
    claims = {f"ONNX Runtime Web {runtime['version']}": "the runtime's version",
              f"| {runtime['files']['ort-wasm-simd-threaded.wasm'] / 1e6:.1f} MB |": "the .wasm size",
              f"{model['model.onnx'] / 1e6:.1f} MB + {model['schedule.json'] / 1e6:.2f} MB": "model + schedule",
              f"about {manifest['page_weight_bytes'] / 1e6:.0f} MB": "the total"}
    for claim, what in claims.items():
        assert claim in text, f"book/try_it.md should state {what} of this build as {claim!r}"


def test_runtime_licence_ships_beside_it(site):
    html, _, manifest = site
    ort_dir = html / "_static" / "demo" / "ort"
    licence = (ort_dir / "LICENSE.txt").read_text()
    assert f"onnxruntime-web {manifest['runtime']['version']}" in licence
    assert "MIT" in licence and "Microsoft Corporation" in licence
    assert "Permission is hereby granted" in licence, "the full MIT text (from the onnxruntime package)"
    assert sorted(p.name for p in ort_dir.iterdir() if p.suffix in (".js", ".mjs", ".wasm")) == \
        sorted(manifest["runtime"]["files"]), "only the files the page needs are copied"


def test_note_without_runtime(demo):
    """A build without npm: the manifest says why, and the page shows that in place of the demo."""
    reason = "this site was built without npm (test)."
    demo.page.route("**/_static/demo/manifest.json", lambda route: route.fulfill(
        content_type="application/json",
        body=json.dumps({"model": {"files": {}}, "runtime": {"missing": reason},
                         "page_weight_bytes": 0, "ready": False})))
    demo.open(state="unavailable")
    note = demo.page.locator("#ddpm-demo .ddpm-demo-note").inner_text()
    assert "not available" in note and reason in note
    assert demo.page.locator('#ddpm-demo [name="generate"]').count() == 0
    demo.check_clean()


@pytest.mark.skipif(not os.environ.get("DEMO_TIMING_RUNS"),
                    reason="a measurement, not a check: DEMO_TIMING_RUNS=N runs it (book/results.md)")
def test_time_per_step(demo, site):
    """Time per DDIM step and per image in this browser, beside PyTorch's ``ddim_sample`` and
    native ONNX Runtime timed right after each browser run, under the same load (the numbers in
    book/results.md; run with -s to see them). 50 steps, batch 8, one thread each, after a
    warm-up run; ``DEMO_TIMING_RUNS`` runs."""
    html, _, manifest = site
    model, schedule, _ = model_from_checkpoint(shipped_checkpoint_path(DEMO_CHECKPOINT))
    ort = pytest.importorskip("onnxruntime")
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(html / "_static" / "demo" / "model.onnx"), options,
                                   providers=["CPUExecutionProvider"])
    feed = {"x_t": np.zeros((N, 1, 28, 28), np.float32), "t": np.full(N, 500, np.int64),
            "y": np.full(N, model.config.num_classes, np.int64)}   # the null class: unguided
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    demo.open()
    demo.generate(seed=0, steps=10)                    # warm-up: runtime and model loaded
    rows = {"browser": [], "pytorch": [], "onnxruntime": []}
    try:
        for seed in range(1, 1 + int(os.environ["DEMO_TIMING_RUNS"])):
            run = demo.generate(seed=seed, steps=50)
            assert len(run["stepMs"]) == 50
            rows["browser"].append(statistics.median(run["stepMs"]))
            start = time.perf_counter()
            ddim_sample(model, schedule, n=N, steps=50, progress=False)
            rows["pytorch"].append((time.perf_counter() - start) / 50 * 1000)
            start = time.perf_counter()
            for _ in range(50):
                session.run(["eps"], feed)
            rows["onnxruntime"].append((time.perf_counter() - start) / 50 * 1000)
    finally:
        torch.set_num_threads(threads)
    print(f"\nbatch {N}, 50 DDIM steps, one thread, load average {os.getloadavg()[0]:.1f}; "
          f"page weight {manifest['page_weight_bytes']:,} bytes")
    for name, ms in rows.items():
        step = statistics.median(ms)
        print(f"  {name:12s} {step:6.1f} ms per step (median of {len(ms)} runs; fastest run {min(ms):.1f}), "
              f"{step * 50 / N / 1000:.2f} s per image")
    demo.check_clean()
