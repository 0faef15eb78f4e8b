"""The errors a user can meet: each names the problem and its fix, and the command line prints it as one
``error: ...`` line (exit status 2). Every other exception is a programming error and keeps its traceback."""
from __future__ import annotations


class UserError(ValueError):
    """A problem with the user's input, settings or outputs: the command line prints
    its message as one ``error: ...`` line (exit status 2). Every other exception
    is a programming error and keeps its traceback."""


class InputNotFoundError(UserError, FileNotFoundError):
    """An input path that does not exist, or a folder without slices."""


class OutputExistsError(UserError, FileExistsError):
    """An output that exists and may not be replaced."""


class DamagedFileError(UserError):
    """A file that is cut short or is not what its header says."""

    @classmethod
    def of(cls, path, what: str, detail: str) -> "DamagedFileError":
        """The one message for a damaged file of any format: ``what`` it should be ('TIFF', 'HDF5 file', ...)
        and ``detail``, what the reader said."""
        return cls(f"'{path}' is damaged or not a valid {what} ({detail}). Check that the file was copied "
                   "completely, or export it again.")
