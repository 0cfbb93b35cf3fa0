"""Sphinx extension: what the published site needs besides its pages.

1. **Its address, from the one ``repository.url``** in ``_config.yml``. GitHub Pages serves the
   site of https://github.com/OWNER/REPO at https://OWNER.github.io/REPO/ (a repository named
   OWNER.github.io at https://OWNER.github.io/). That address becomes Sphinx's ``html_baseurl``,
   so every page carries ``<link rel="canonical">`` to its published copy. An explicit
   ``html.baseurl`` in ``_config.yml`` (a custom domain) is kept as it is.
2. **A root page that names the favicon.** Jupyter Book writes ``index.html`` as a bare
   redirect to the first page (``_toc.yml``'s root). A browser asks the server for
   /favicon.ico on any page that names no icon, and logs the 404 as a console error; on a
   project site that request even leaves the site (OWNER.github.io/favicon.ico). So the
   redirect is written here, with the icon (``html.favicon`` in ``_config.yml``) and the
   canonical link, before Jupyter Book's own writer, which then leaves it alone.
"""
from __future__ import annotations

import re
from pathlib import Path

GITHUB = re.compile(r"https://github\.com/(?P<owner>[^/]+)/(?P<repo>[^/]+?)(?:\.git)?/?")


def pages_url(repository_url: str) -> str:
    """GitHub Pages' address of a repository's site, ending in '/'.

    >>> pages_url("https://github.com/Some-Org/ddpm-book")
    'https://some-org.github.io/ddpm-book/'
    """
    match = GITHUB.fullmatch(repository_url.strip())
    if not match:
        raise ValueError(f"repository.url in _config.yml must be a GitHub repository "
                         f"(https://github.com/OWNER/REPO) for the site's address, got {repository_url!r}")
    owner, repo = match.group("owner").lower(), match.group("repo")   # host names are lower case
    return f"https://{owner}.github.io/" if repo.lower() == f"{owner}.github.io" else f"https://{owner}.github.io/{repo}/"


def set_baseurl(app, config) -> None:
    url = (config.html_theme_options or {}).get("repository_url")
    if url and not config.html_baseurl:
        config.html_baseurl = pages_url(url)


def write_root_redirect(app, exception) -> None:
    if exception is not None or app.builder.format != "html" or app.config.root_doc == "index":
        return
    target = f"{app.config.root_doc}.html"
    icon = f'<link rel="icon" href="_static/{Path(app.config.html_favicon).name}">\n' if app.config.html_favicon else ""
    canonical = f'<link rel="canonical" href="{app.config.html_baseurl}{target}">\n' if app.config.html_baseurl else ""
    (Path(app.outdir) / "index.html").write_text(
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">\n'
        f'<meta http-equiv="Refresh" content="0; url={target}" />\n{icon}{canonical}'
        f'<title>{app.config.html_title or app.config.project}</title></head>\n'
        f'<body><p><a href="{target}">Continue to the book</a></p></body></html>\n', encoding="utf8")


def setup(app):
    app.connect("config-inited", set_baseurl)
    app.connect("build-finished", write_root_redirect, priority=400)   # before sphinx-external-toc's (500)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
