"""``python -m taskrunner``: the same as the ``taskrunner`` command."""

from taskrunner.cli import entrypoint

entrypoint()
