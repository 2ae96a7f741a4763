"""The one error type the tool raises for bad input: a one-line message naming the problem and the fix."""


class AnalyzerError(ValueError):
    """Bad input (a file, a dataset, a model, an option). The message is meant for the person, one line."""


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message, for wrapping a library's error into a one-line message."""
    text = str(exc).strip().splitlines()
    return text[0][:limit] if text else type(exc).__name__
