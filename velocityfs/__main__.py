"""Allow ``python -m velocityfs`` (the test fixtures start the daemon this way)."""

from velocityfs.cli.main import main

main()
