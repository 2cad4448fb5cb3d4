"""Parley's benchmark harness (issue #8): `python -m bench` for the full run, `python -m bench --smoke` for the
seconds-long check that `make test` runs. Results land in `bench/results/`."""
