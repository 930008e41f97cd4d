"""Hydra configuration tree of uae_lightning (a package so that it ships inside the wheel)."""
