"""Python imports this at the start of every process with tests/doubles on its PYTHONPATH: a run that
sets ROLLFLEET_TEST_SHIFT or ROLLFLEET_TEST_SWAP in its spec's `env` (which reaches every Ray actor of
that run, and no other run's) gets the broken weight mapping of broken_mapping.py in its engines."""

import os

if os.environ.get("ROLLFLEET_TEST_SHIFT") or os.environ.get("ROLLFLEET_TEST_SWAP"):
    import broken_mapping

    broken_mapping.install()
