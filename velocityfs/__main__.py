"""Allow ``python -m velocityfs`` (the test fixtures start the daemon this way).

Named ``velocityfs`` as the installed command is: in usage lines, and for shell
completion, whose variable (``_VELOCITYFS_COMPLETE``) click derives from the name.
"""

from velocityfs.cli.main import main

main(prog_name="velocityfs")
