"""CLI verbs. Each module defines `register(app)` adding its verb(s) to the typer app.

Keep these modules thin: parse options, call the library, print a summary.
"""
