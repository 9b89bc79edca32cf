"""Experiment drivers and the `fedenc` command line; they assemble library code from `common`."""
