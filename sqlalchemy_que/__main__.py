"""``python -m sqlalchemy_que``: the command line, as ``sqlalchemy-que``."""

from .cli import main

main()
