"""The `cotune` command line. Imported by nothing but its own entry point and tests."""
