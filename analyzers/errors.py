"""The one error type the tool raises for bad input: a one-line message naming the problem and the fix."""


class AnalyzerError(ValueError):
    """Bad input (a file, a dataset, a model, an option). The message is meant for the person, one line."""


class InvalidOption(AnalyzerError):
    """An option the caller gave is invalid. A run stops on it at once: an analysis that does not apply to a model
    is skipped with its reason, but a mistyped option is the caller's to fix, not a finding about the model."""


class RunExists(AnalyzerError):
    """A run directory already holds a different run and replacing it was not asked for. Whoever asks (the command
    line, a dashboard page) names its own way to replace it."""

    def __init__(self, message: str, path):
        super().__init__(message)
        self.path = path


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message, for wrapping a library's error into a one-line message."""
    text = str(exc).strip().splitlines()
    return text[0][:limit] if text else type(exc).__name__


def whole_number(value, name: str, least: int, fix: str | None = None) -> int:
    """`value` as an int when it is a whole number (not a bool) of at least `least`; else an InvalidOption naming
    `name` and, when given, the `fix`. Numpy integers count (they register as numbers.Integral; numpy's bool does
    not)."""
    import numbers

    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
        raise InvalidOption(f"{name} must be a whole number of at least {least}, got {value!r}"
                            + (f": {fix}" if fix else ""))
    return int(value)
