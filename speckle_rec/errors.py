"""Exceptions raised for bad input.

Every message is one line that names the file (when there is one) and the problem, so the command
line can print it as is and exit non-zero without a traceback.
"""


class SpeckleRecError(Exception):
    """Base class of the errors speckle_rec reports to a user as one line."""


class DataError(SpeckleRecError, ValueError):
    """Input data (a file, an array read from one, or an argument) breaks the contract."""

    def __init__(self, problem, source=None):
        self.problem = str(problem)
        self.source = None if source is None else str(source)
        super().__init__(self.problem if self.source is None else f"{self.source}: {self.problem}")


def where(source, name):
    """Return ``name`` qualified with the file it came from, for error messages."""
    return name if source is None else f"{name} in {source}"
