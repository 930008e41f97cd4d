"""`python -m uae_lightning`: the command line (cli.py; Hydra lives there, so jobs are named after it, not __main__)."""
from uae_lightning.cli import main

if __name__ == "__main__":
    main()
