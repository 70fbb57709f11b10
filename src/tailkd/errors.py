"""The one exception type a user is meant to see: printed as one line by the CLI, no traceback."""


class TailkdError(Exception):
    """A problem with the user's input or environment, with its fix in the message.

    The CLI prints ``tailkd: error: <message>`` and exits with code 2; ``--debug`` shows the traceback.
    Library code raises it (or ``ValueError`` for bad arguments) with a message that names the
    problem and how to fix it.
    """
