"""The one error type users see: a single line that names where the problem is."""


class FedllmError(Exception):
    """Bad input or a failed step, explained in one line.

    The message always names the place to fix: a file and line, a config field, a
    URI, a site. The CLI prints it as ``error: <message>`` and exits non-zero.
    """


def run_command(parser, argv=None) -> int:
    """Parse ``argv`` with ``parser`` and run the subcommand it chose (``args.func``): the
    exit code of every fedllm command line. A FedllmError is ``error: <message>`` on stderr
    and exit 2; Ctrl-C is exit 130."""
    import sys

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except FedllmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
