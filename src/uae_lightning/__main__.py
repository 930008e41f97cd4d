"""`python -m uae_lightning`: the CLI (Hydra lives in cli.py so jobs are named after it, not __main__)."""
from uae_lightning.cli import main

if __name__ == "__main__":
    main()
