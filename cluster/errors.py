"""The one exception type for problems a user can cause and fix.

Core code raises it with a message that says what to do; the CLI prints the message
without a traceback, and a worker stores it as the job's error (a permanent failure).
"""


class GauntletError(Exception):
    """A user-facing error: bad file, unknown name, value out of range."""
