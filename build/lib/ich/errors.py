"""The user-facing error type shared by every step (kept apart from cli.py so that
`python -m ich.cli` and the `ich` script see one and the same class)."""


class StepError(RuntimeError):
    """A fatal, user-facing error of a step: the message says what is wrong and what to do."""
