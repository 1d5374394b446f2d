"""The benchmark of issue 3 (`make bench`, `python -m tests.bench --help`); not collected by pytest."""
