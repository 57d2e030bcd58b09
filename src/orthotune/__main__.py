"""``python -m orthotune``: the command line."""

from .cli import main

main()
