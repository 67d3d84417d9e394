"""The one exception type for user mistakes: the CLI prints it on one line and exits 2."""


class UserError(Exception):
    """Bad input the user can fix. The message names the bad value and the fix; no traceback is shown."""

    exit_code = 2
