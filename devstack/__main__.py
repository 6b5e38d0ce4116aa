"""``python -m devstack``: the ``distillery-server`` command line (``python -m devstack up``)."""

from devstack.cli import main

main()
