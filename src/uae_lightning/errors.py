"""The errors a user can cause and fix (a bad config value, a missing file), and how the command lines report them:
one line, no traceback, exit code 2 (1 for a run that diverged); UAE_DEBUG=1 shows the traceback. Imports nothing
heavy: the command line reports a bad config before torch is imported."""
from __future__ import annotations

import logging
import os
import sys


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key, the value and what is allowed."""


# runner.run adds a diverged run and a run directory in use.
USER_ERRORS = (ConfigError, FileNotFoundError, ValueError)


def fail(err: Exception, code: int = 2) -> None:
    if os.environ.get("UAE_DEBUG") == "1":
        raise err
    logging.getLogger("uae_lightning").error("%s: %s  (UAE_DEBUG=1 shows the traceback)", type(err).__name__, err)
    sys.exit(code)
