"""``python -m sqlalchemy_que``: the command line, as ``sqlalchemy-que``."""

from ._cli import main

main()
