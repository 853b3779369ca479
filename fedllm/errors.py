"""The one error type users see: a single line that names where the problem is."""


class FedllmError(Exception):
    """Bad input or a failed step, explained in one line.

    The message always names the place to fix: a file and line, a config field, a
    URI, a site. The CLI prints it as ``error: <message>`` and exits non-zero.
    """
