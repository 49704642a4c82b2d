"""taskrunner: run a command only when no other run holds its lock.

The command-line tool lives in :mod:`taskrunner.cli`. This module stays tiny on purpose:
a cron wrapper must start in milliseconds, so nothing is imported here that the command
line does not need.
"""

__version__ = "0.1.0"
