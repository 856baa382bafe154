"""``python -m morphseek``: the ``morphseek`` command."""

from .cli import run

run()
