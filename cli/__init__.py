"""The ``fedenc`` command line: one typer app (``cli.main``), its commands grouped by what they touch."""
