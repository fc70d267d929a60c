"""`python -m pipeline` runs the CLI."""

from .cli import app

app(prog_name="pipeline")
