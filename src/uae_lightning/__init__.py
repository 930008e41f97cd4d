"""uae_lightning: train unified auto-encoders (UAE) with Lightning + Hydra. Entry points: `python -m uae_lightning`
(training), `python -m uae_lightning.bench`, `python -m uae_lightning.pipeline`."""
