"""``python -m reliable_messaging``: the ``reliable-messaging`` command."""

from ._cli import main

main()
