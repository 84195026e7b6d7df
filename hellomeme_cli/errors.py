"""The one exception the library raises for bad input; the CLI prints it as one red line and exits 1."""


class HellomemeError(Exception):
    """A problem the user can fix (a missing file, a wrong checkpoint, ...), said in one line."""


def first_line(error: BaseException) -> str:
    """The first non-empty line of an error's message (a library's can run to pages), or its type."""
    return next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
