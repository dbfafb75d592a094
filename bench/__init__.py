"""corefleet benchmarks: ``python -m bench --help`` lists them (see bench/README.md)."""
