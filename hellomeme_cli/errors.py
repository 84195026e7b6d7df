"""The one exception the library raises for bad input; the CLI prints it as one red line and exits 1."""


class HellomemeError(Exception):
    """A problem the user can fix (a missing file, a wrong checkpoint, ...), said in one line."""
