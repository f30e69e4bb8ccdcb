"""Hydra configs of verl-npd (a package so that Hydra can find them from `python -m`)."""
