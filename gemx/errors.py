"""The one error type users see.

Anything a user can cause (a bad file, a wrong shape, a missing optional backend) is raised as a
`GemxError` whose message says what was wrong and what to do. The CLI prints it as one red line and
exits non-zero; any other exception is a bug in gemx and keeps its traceback.
"""


class GemxError(Exception):
    """A problem with the user's input or environment, with a message that says how to fix it."""


def check_positive(**values: object) -> None:
    """Refuse options that must be positive integers (`None` means "the default"): one place for every command.

        check_positive(iters=opts.iters, threads=opts.threads)  # "--threads must be a positive integer, got -2"
    """
    for name, value in values.items():
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise GemxError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
