"""uae_lightning: train unified auto-encoders (UAE) with Lightning + Hydra. Entry points: `python -m uae_lightning`
(training), `python -m uae_lightning.bench`, `python -m uae_lightning.pipeline`."""
from omegaconf import OmegaConf

# The configs' one piece of arithmetic, `${uae_times:k,n}` = k * n, with null staying null (conf/stage/u4g.yaml sizes
# U4G's held-out set with it): registered when the package is imported, so whatever reads a run's config (training,
# the bench, the pipeline) resolves it.
OmegaConf.register_new_resolver("uae_times", lambda k, n: None if n is None else int(k) * int(n), replace=True)
