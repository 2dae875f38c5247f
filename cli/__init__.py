"""The `itconv-fast` command-line interface (a Click app), importable as `itconv_fast.cli`."""
