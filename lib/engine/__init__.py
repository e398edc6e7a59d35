"""Pure-torch engine: never imports monailabel, so it runs in scripts, tests and benchmarks alike."""
