"""Repository-wide pytest settings (the test suite's own fixtures are in tests/conftest.py)."""

import importlib.util

# `--doctest-modules` imports every module of the package; `keras_resmem.beam`
# needs the optional extra `beam` (apache-beam), so it is skipped without it.
collect_ignore_glob = [] if importlib.util.find_spec("apache_beam") else ["keras_resmem/beam/*"]
