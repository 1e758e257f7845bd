"""`python -m settlement ...`: the same typer app `meritnet settlement` mounts."""

from settlement.cli import app

app()
