"""One base class for every error a user can cause.

Bad input, a missing file, a refused action: the library raises a subclass of `UserError` whose
message says what went wrong and what to do next. The CLI turns it into one `error: ...` line and
exit code 2, the app into one message; anything else is a bug and keeps its traceback.

This module imports nothing, so every layer (zoo/, composer/, the fronts) can use it.
"""


class UserError(ValueError):
    """Something the user can fix; the message is shown to them as it is."""
