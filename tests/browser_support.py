"""What the browser tests share: Debian's Chromium (Playwright never downloads a browser here),
its flags for a closed network, and a local static server for the built book."""
from __future__ import annotations

import functools
import os
import threading
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

# Debian's chromium; DDPM_CHROMIUM names another installed Chromium-based browser (GitHub's
# Ubuntu runners: their preinstalled Google Chrome, set by .github/workflows/tests.yml).
CHROMIUM = Path(os.environ.get("DDPM_CHROMIUM") or "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@contextmanager
def serve(folder: Path):
    """Serve ``folder`` on 127.0.0.1 at a free port; yields the base URL. With the MIME types
    ONNX Runtime Web needs: its loader is an ES module (.mjs), and WebAssembly streams only
    as application/wasm."""
    class Handler(SimpleHTTPRequestHandler):
        extensions_map = {**SimpleHTTPRequestHandler.extensions_map,
                          ".mjs": "text/javascript", ".wasm": "application/wasm"}

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


def launch(sync_api):
    """A generator for a module-scoped pytest fixture: one headless Chromium, closed at the end."""
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()
