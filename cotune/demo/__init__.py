"""The demo: the synthetic world, tiny pretrained models and the quickstart's processes.
Used by the CLI's `demo` and by the benchmarks; imports nothing from the CLI."""
