"""Ready to publish: the GitHub workflows, and the built site as a reader on GitHub Pages meets it.

- actionlint finds nothing wrong in .github/workflows/ (and does find a planted mistake);
- the workflows keep their promises: the tests workflow runs .ci/run, the one CI script, which
  ends in the README's test command; the Pages workflow builds with `make book` (npm ci for the
  demo's runtime), adds .nojekyll and deploys with GitHub's own Pages actions;
- every Colab link and launch button opens, in Colab, a notebook of ``repository.url`` that
  the repository holds; every chapter page has its launch button;
- the link check: every internal link and anchor of the built site resolves, nothing a page
  loads comes from elsewhere, and every link out of the site goes to Colab or the repository;
- the site's address (each page's canonical link) is GitHub Pages' address of ``repository.url``;
- in Chromium: the root page and every page outside the chapters (whose pages
  tests/test_browser.py opens) load without a console error, the favicon's included, and
  without a request leaving the site.
"""
from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / ".github" / "workflows"
sys.path.insert(0, str(ROOT / "tools"))
import colab_setup  # noqa: E402

COLAB = "https://colab.research.google.com"
# Where a link may lead out of the site: Colab (the launch buttons and badges) and GitHub
# (the repository and issue buttons). Pages never *load* anything from outside.
OUTSIDE_HOSTS = ("colab.research.google.com", "github.com")
SITE = "http://site.invalid/"      # a stand-in origin for resolving the site's relative links


def _load_publish_extension():
    spec = importlib.util.spec_from_file_location("publish", ROOT / "book" / "_ext" / "publish.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


publish = _load_publish_extension()


# --- the workflows ---------------------------------------------------------------------------

def actionlint() -> str:
    """The actionlint binary the test extra installs (beside this Python), or one on PATH."""
    here = Path(sys.executable).with_name("actionlint")
    found = str(here) if here.is_file() else shutil.which("actionlint")
    if not found:
        pytest.fail("actionlint is missing: it comes with the test extra (pip install -e '.[test]')")
    return found


def run_actionlint(*files) -> subprocess.CompletedProcess:
    return subprocess.run([actionlint(), "-no-color", *map(str, files)], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)


def workflow(name: str) -> dict:
    return yaml.safe_load((WORKFLOWS / name).read_text())


def steps(wf: dict) -> list:
    return [step for job in wf["jobs"].values() for step in job.get("steps", [])]


def test_workflows_pass_actionlint():
    files = sorted(WORKFLOWS.glob("*.yml"))
    assert {f.name for f in files} >= {"tests.yml", "pages.yml"}, f"workflows: {[f.name for f in files]}"
    result = run_actionlint(*files)
    assert result.returncode == 0, f"actionlint:\n{result.stdout}{result.stderr}"


def test_actionlint_finds_a_mistake(tmp_path):
    """The check can fail: an unknown runner label, an expression on an undefined context and a
    job that needs a missing one are reported."""
    bad = tmp_path / ".github" / "workflows" / "bad.yml"
    bad.parent.mkdir(parents=True)
    bad.write_text("on: push\njobs:\n  a:\n    runs-on: ubuntu-lates\n    needs: nothing\n"
                   "    steps:\n      - run: echo ${{ secret.TOKEN }}\n")
    result = run_actionlint(bad)
    assert result.returncode == 1, result.stdout
    for expected in ("ubuntu-lates", "nothing", "secret"):
        assert expected in result.stdout, f"actionlint did not report {expected!r}:\n{result.stdout}"


def test_tests_workflow_runs_the_one_ci_script():
    """GitHub and the project's own CI run the same file, .ci/run, which ends in exactly the
    README's test command; the job has a time limit and pip and npm caches."""
    wf = workflow("tests.yml")
    triggers = wf[True] if True in wf else wf["on"]      # YAML 1.1 reads the key `on` as True
    assert {"push", "pull_request"} <= set(triggers)
    (job,) = wf["jobs"].values()
    assert 0 < job["timeout-minutes"] <= 60
    runs = [s.get("run", "") for s in job["steps"]]
    assert "bash .ci/run" in runs, f"the tests workflow must call .ci/run, not its own commands: {runs}"
    assert not [r for r in runs if "make test" in r or "pytest" in r], "tests run through .ci/run only"
    uses = {s["uses"].split("@")[0]: s.get("with", {}) for s in job["steps"] if "uses" in s}
    assert uses["actions/setup-python"].get("cache") == "pip"
    assert uses["actions/setup-node"].get("cache") == "npm"

    script = (ROOT / ".ci" / "run").read_text()
    commands = [line.strip() for line in script.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    readme = (ROOT / "README.md").read_text()
    assert re.search(r"^make test\b", readme, re.M), "the README's test command is `make test`"
    assert commands[-1] == "make test", f".ci/run must end with the README's test command, not {commands[-1]!r}"
    assert "dataset-fashion-mnist" in script and "torchvision" in script, \
        ".ci/run installs the Debian data package where it exists and says when it falls back to the download"


def test_pages_workflow_builds_and_deploys_with_the_official_actions():
    wf = workflow("pages.yml")
    uses = [s["uses"].split("@")[0] for s in steps(wf) if "uses" in s]
    for action in ("actions/checkout", "actions/setup-python", "actions/configure-pages",
                   "actions/upload-pages-artifact", "actions/deploy-pages"):
        assert action in uses, f"pages.yml does not use {action}"
    runs = "\n".join(s.get("run", "") for s in steps(wf))
    assert "make book" in runs, "the book is built by the README's command (it runs npm ci for the demo)"
    assert "touch _build/html/.nojekyll" in runs
    upload = next(s for s in steps(wf) if s.get("uses", "").startswith("actions/upload-pages-artifact"))
    assert upload["with"]["path"] == "_build/html"
    assert wf["permissions"] == {"contents": "read", "pages": "write", "id-token": "write"}
    assert "npm ci" in (ROOT / "Makefile").read_text(), "make book installs the demo's runtime with npm ci"


# --- the site's address ----------------------------------------------------------------------

@pytest.mark.parametrize("url, expected", [
    ("https://github.com/ddpm-from-scratch/ddpm-from-scratch", "https://ddpm-from-scratch.github.io/ddpm-from-scratch/"),
    ("https://github.com/Some-Org/Book.git", "https://some-org.github.io/Book/"),
    ("https://github.com/someone/someone.github.io/", "https://someone.github.io/"),
])
def test_pages_url(url, expected):
    assert publish.pages_url(url) == expected


def test_pages_url_needs_github():
    with pytest.raises(ValueError, match="GitHub repository"):
        publish.pages_url("https://gitlab.com/a/b")


# --- the built site --------------------------------------------------------------------------

class Page(HTMLParser):
    """One HTML page's anchors (id and name), links (a href), loads (what the browser fetches
    for the page: scripts, styles, icons, images, frames) and canonical link."""

    LOADED = {"script": "src", "img": "src", "iframe": "src", "source": "src", "video": "src",
              "audio": "src", "embed": "src", "object": "data", "input": "src"}

    def __init__(self, path: Path):
        super().__init__(convert_charrefs=True)
        self.ids, self.links, self.loads, self.canonical = set(), [], [], None
        self.launch = []            # hrefs of the "Launch on Colab" buttons
        self.feed(path.read_text(encoding="utf-8"))

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for key in ("id", "name") if tag == "a" else ("id",):
            if a.get(key):
                self.ids.add(a[key])
        if tag == "a" and a.get("href"):
            self.links.append(a["href"])
            if a.get("title") == "Launch on Colab":
                self.launch.append(a["href"])
        elif tag == "link" and a.get("href"):
            rel = (a.get("rel") or "").split()
            if "canonical" in rel:
                self.canonical = a["href"]
            elif "alternate" not in rel:
                self.loads.append(a["href"])
        elif tag in self.LOADED and a.get(self.LOADED[tag]):
            self.loads.append(a[self.LOADED[tag]])
        for candidate in (a.get("srcset") or "").split(","):
            if candidate.strip():
                self.loads.append(candidate.split()[0])


@pytest.fixture(scope="module")
def site(built_book) -> dict:
    """Every page of the built site, parsed: {path relative to the site root: Page}.
    _static/ holds the theme's files (and its Jinja fragments, which are no pages)."""
    pages = {p.relative_to(built_book).as_posix(): Page(p) for p in sorted(built_book.rglob("*.html"))
             if p.relative_to(built_book).parts[0] != "_static"}
    assert "index.html" in pages and "book/intro.html" in pages and len(pages) > 10
    return pages


def resolve(page: str, href: str) -> tuple[str | None, str]:
    """(path inside the site or None for a link out of it, fragment) of ``href`` on ``page``."""
    url = urljoin(SITE + page, href)
    if not url.startswith(SITE):
        return None, ""
    parts = urlsplit(url)
    path = unquote(parts.path)[1:]
    return (path + "index.html" if path.endswith("/") or not path else path), unquote(parts.fragment)


def is_outside(href: str) -> bool:
    return bool(re.match(r"[a-z][a-z0-9+.-]*:", href, re.I)) and not href.startswith(("data:", "blob:"))


def test_internal_links_and_anchors_resolve(built_book, site):
    broken = []
    for page, parsed in site.items():
        for href in parsed.links + parsed.loads:
            if is_outside(href) or href.startswith(("data:", "blob:")):
                continue
            target, fragment = resolve(page, href)
            if target is None:
                broken.append(f"{page}: {href} leaves the site")
            elif not (built_book / target).is_file():
                broken.append(f"{page}: {href} -> {target} does not exist")
            elif fragment and target.endswith(".html"):
                ids = site[target].ids if target in site else Page(built_book / target).ids
                if fragment not in ids:
                    broken.append(f"{page}: {href} -> no id {fragment!r} in {target}")
    assert not broken, f"{len(broken)} broken links:\n" + "\n".join(broken[:40])


def test_nothing_loads_from_outside_and_links_out_only_to_colab_or_the_repository(built_book, site):
    repo_url, _ = colab_setup.repository()
    loads, links = [], []
    for page, parsed in site.items():
        loads += [f"{page}: {u}" for u in parsed.loads if is_outside(u)]
        for href in parsed.links:
            if not is_outside(href):
                continue
            host = urlsplit(href).hostname or ""
            if host not in OUTSIDE_HOSTS or (host == "github.com" and not href.startswith(repo_url)):
                links.append(f"{page}: {href}")
    css = [f"{p.relative_to(built_book)}: {m}" for p in built_book.rglob("*.css")
           for m in re.findall(r"url\(\s*['\"]?((?:https?:)?//[^)'\"]+)", p.read_text(errors="replace"))]
    assert not loads, "pages load files from outside the site:\n" + "\n".join(loads[:20])
    assert not css, "stylesheets load files from outside the site:\n" + "\n".join(css[:20])
    assert not links, (f"links out of the site go to Colab or {repo_url} only:\n" + "\n".join(links[:20]))


def tracked_files() -> set:
    """The files the repository holds (what GitHub, and so Colab, can open)."""
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):   # not a git checkout (an unpacked archive)
        return {p.relative_to(ROOT).as_posix() for p in ROOT.rglob("*.ipynb")}
    return set(filter(None, out.split("\0")))


def test_colab_links_open_notebooks_of_the_repository(site):
    """Every Colab link (launch buttons and the badges in the chapters) is Colab's address of a
    notebook that repository.url holds on its branch; every chapter page launches itself."""
    repo_url, branch = colab_setup.repository()
    prefix = f"{COLAB}/github/{repo_url.split('github.com/')[1]}/blob/{branch}/"
    tracked = tracked_files()
    wrong, missing, seen = [], [], 0
    for page, parsed in site.items():
        for href in parsed.links:
            if urlsplit(href).hostname != "colab.research.google.com":
                continue
            seen += 1
            if not href.startswith(prefix):
                wrong.append(f"{page}: {href}")
            elif not (href[len(prefix):].endswith(".ipynb") and href[len(prefix):] in tracked):
                missing.append(f"{page}: {href[len(prefix):]}")
        if page.startswith("notebooks/"):
            assert parsed.launch == [prefix + page.replace(".html", ".ipynb")], \
                f"{page}: launch buttons {parsed.launch}, expected one for its own notebook"
    assert seen, "the site has no Colab link at all"
    assert not wrong, f"Colab links that do not open {repo_url}@{branch}:\n" + "\n".join(wrong)
    assert not missing, ("Colab links to notebooks the repository does not hold (not committed?):\n"
                         + "\n".join(missing))


def test_pages_name_their_published_address(site):
    """Each page's canonical link is its address on GitHub Pages, derived from repository.url."""
    base = publish.pages_url(colab_setup.repository()[0])
    wrong = [f"{page}: {p.canonical}" for page, p in site.items()
             if page not in ("index.html", "search.html", "genindex.html") and p.canonical != base + page]
    assert not wrong, f"canonical links not under {base}:\n" + "\n".join(wrong[:10])
    assert site["index.html"].canonical == base + "book/intro.html"


def test_favicon_on_every_page(built_book, site):
    missing = [page for page, p in site.items()
               if not any(u.endswith("favicon.ico") for u in p.loads)]
    assert not missing, f"pages without an icon link (the browser asks for /favicon.ico and logs a 404): {missing}"
    assert (built_book / "_static" / "favicon.ico").read_bytes()[:4] == b"\0\0\1\0", "an ICO file"


# --- in the browser --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def chromium():
    from browser_support import CHROMIUM, launch
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")
    yield from launch(pytest.importorskip("playwright.sync_api", reason="the playwright Python package is missing"))


@pytest.mark.browser
def test_reading_pages_load_cleanly_in_chromium(built_book, site, chromium):
    """The root address redirects to the first page; it and every page outside the chapters
    load with no console error (a missing favicon logs one) and no request leaving the site."""
    from browser_support import serve
    pages = [p for p in site if not p.startswith("notebooks/") and p != "index.html"]
    errors, outside = [], []
    with serve(built_book) as base:
        # Requests are recorded, not intercepted: with interception on (context.route), Chromium
        # no longer fetches the icon, and a missing one would go unnoticed.
        context = chromium.new_context()
        context.on("request", lambda r: r.url.startswith((base + "/", "data:", "blob:")) or outside.append(r.url))
        page = context.new_page()
        page.on("console", lambda m: m.type == "error" and errors.append(f"{page.url}: {m.text}"))
        page.on("pageerror", lambda e: errors.append(f"{page.url}: {e}"))
        try:
            page.goto(base + "/")
            page.wait_for_url("**/book/intro.html")
            # Chromium asks for the icon after the page has loaded (and only once per browser,
            # hence a fresh browser for this test): give it the time to, and to log a 404.
            page.wait_for_load_state("networkidle")
            page.wait_for_timeout(2000)
            for name in pages:
                page.goto(f"{base}/{name}", wait_until="load")
            page.wait_for_load_state("networkidle")
        finally:
            context.close()
    assert not outside, f"requests left the site: {outside}"
    assert not errors, "console errors:\n" + "\n".join(errors)


# --- .ci/run on Debian and on Ubuntu -----------------------------------------------------------

def run_ci_script(tmp_path, has_data_package: bool, chromium: str = "") -> tuple[str, str]:
    """.ci/run in a copy of its folder, with apt-get, apt-cache, make and the venv's python
    replaced by stand-ins that log their arguments: (what the script printed, the log)."""
    repo = tmp_path / "repo"
    (repo / ".ci").mkdir(parents=True)
    shutil.copy(ROOT / ".ci" / "run", repo / ".ci" / "run")
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    stand_in = '#!/bin/sh\necho "$(basename "$0") $*" >> "{log}"\n{extra}\n'
    apt_cache = f'[ "$2" = dataset-fashion-mnist ] && exit {0 if has_data_package else 100}\nexit 0'
    for name, extra in {"apt-get": "", "apt-cache": apt_cache, "make": "", "sudo": 'exec "$@"'}.items():
        (bin_dir / name).write_text(stand_in.format(log=log, extra=extra))
        (bin_dir / name).chmod(0o755)
    (repo / ".venv" / "bin").mkdir(parents=True)
    (repo / ".venv" / "bin" / "python").write_text(stand_in.format(log=log, extra=""))
    (repo / ".venv" / "bin" / "python").chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), "DDPM_CHROMIUM": chromium}
    out = subprocess.run(["bash", str(repo / ".ci" / "run")], capture_output=True, text=True, env=env,
                         timeout=30)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout, log.read_text()


def test_ci_script_on_debian(tmp_path):
    """Debian: the data package and Debian's chromium are installed; then `make test`, nothing else."""
    printed, calls = run_ci_script(tmp_path, has_data_package=True)
    install = next(line for line in calls.splitlines() if line.startswith("apt-get install"))
    for package in ("dataset-fashion-mnist", "chromium", "make", "git", "shellcheck"):
        assert package in install.split(), install
    assert [line for line in calls.splitlines() if line.startswith("make")] == ["make test"]
    assert "torchvision" not in printed


def test_ci_script_on_ubuntu_falls_back_to_the_download(tmp_path):
    """Ubuntu (no dataset-fashion-mnist, Chrome named by DDPM_CHROMIUM): the log says the data
    comes from torchvision's download, fetched once before `make test`; no chromium package."""
    printed, calls = run_ci_script(tmp_path, has_data_package=False, chromium="/usr/bin/google-chrome")
    assert "dataset-fashion-mnist is not in this system's package lists" in printed
    assert "downloaded by torchvision" in printed and "DDPM_CHROMIUM=/usr/bin/google-chrome" in printed
    install = next(line for line in calls.splitlines() if line.startswith("apt-get install")).split()
    assert "dataset-fashion-mnist" not in install and "chromium" not in install
    order = [line.split()[0] + (" " + line.split()[1] if line.startswith("make") else "")
             for line in calls.splitlines() if line.startswith(("make", "python"))]
    assert order == ["make .venv/.installed", "python", "make test"], order
    assert "load_fashion_mnist" in calls
