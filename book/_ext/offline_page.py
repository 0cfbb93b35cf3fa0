"""Keep every page of the book self-contained: no script that could fetch from the internet.

Jupyter Book 1.x always loads sphinx-thebe, which registers its configuration script twice
(a JavaScript "already declared" error on every page) and points at a CDN. This book runs
code in Colab, not through Thebe, so its scripts are dropped from every page.
"""


def _drop_thebe(app, pagename, templatename, context, doctree):
    scripts = context.get("script_files")
    if scripts:
        context["script_files"] = [s for s in scripts
                                   if "thebe" not in str(s).lower()
                                   and "thebe" not in str(getattr(s, "attributes", {}).get("body", "")).lower()]


def setup(app):
    app.connect("html-page-context", _drop_thebe, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
