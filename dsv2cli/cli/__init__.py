"""The `dsv2` command line: one module per command; each parses options, calls one core function and renders it."""
