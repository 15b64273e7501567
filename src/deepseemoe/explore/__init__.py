"""The explorer (`deepseemoe serve`): a live web app over run directories.

    views.py    what the pages show, read from run directories through runs/ and nothing else;
                every query is bounded (one shard, one document, one unit), never a whole table
    live.py     the model-backed views: a typed text's routing, and interventions on it
    app.py      the web app (Starlette via FastAPI, Jinja templates, vendored static assets) and
                its limits: loopback by default, ids instead of paths, bounded input and rate

The pages render with the report's own components (report/templates/components.html.j2), so
the static report and the explorer show the same thing the same way.
"""
