"""Benchmarks: latency (and later quality, load); each writes JSON, a markdown table and a PNG."""
