"""The `cotune` command line."""
