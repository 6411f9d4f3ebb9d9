"""The one error type users see.

Anything a user can cause (a bad file, a wrong shape, a missing optional backend) is raised as a
`GemxError` whose message says what was wrong and what to do. The CLI prints it as one red line and
exits non-zero; any other exception is a bug in gemx and keeps its traceback.
"""


class GemxError(Exception):
    """A problem with the user's input or environment, with a message that says how to fix it."""
