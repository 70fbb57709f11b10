"""The one exception type a user is meant to see: printed as one line by the CLI, no traceback."""


class TailkdError(Exception):
    """A problem with the user's input or environment, with its fix in the message.

    The CLI prints ``tailkd: error: <message>`` and exits with code 2; ``--debug`` shows the traceback.
    Library code raises it (or ``ValueError`` for bad arguments) with a message that names the
    problem and how to fix it.
    """


class Terminated(KeyboardInterrupt):
    """SIGTERM outside a training loop (`tailkd.cli.main` raises it from the signal): the command unwinds as on
    Ctrl-C — its ``finally`` blocks remove temporary folders, half-written outputs are never moved into place — and
    the CLI prints ``tailkd: terminated`` and exits with 143. A training loop handles the signal itself
    (`tailkd.runs.stop_on_signals`: a checkpoint, then 143)."""
