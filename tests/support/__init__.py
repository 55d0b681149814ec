"""Helpers of the tests: the workflow as the tests run it, and imitations of external things
(hub repos and their files, model families' published files, a SLURM cluster), each built from
the written-down facts its docstring cites. ``tests/conftest.py`` turns them into fixtures."""
