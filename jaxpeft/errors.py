"""The one exception type for user mistakes (bad paths, bad options, bad data).

Library code raises `JaxpeftError` for anything the user can fix; the command-line scripts
catch it and print its message on one line without a traceback. Anything else is a bug and
keeps its traceback.
"""


class JaxpeftError(Exception):
    """A user-facing error: the message alone says what is wrong and how to fix it."""
