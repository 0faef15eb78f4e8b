"""The errors a user can meet: each names the problem and its fix, and the command line prints it as one
``error: ...`` line (exit status 2). Every other exception is a programming error and keeps its traceback."""
from __future__ import annotations

import contextlib
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Union


class UserError(ValueError):
    """A problem with the user's input, settings or outputs: the command line prints
    its message as one ``error: ...`` line (exit status 2). Every other exception
    is a programming error and keeps its traceback."""


class InputNotFoundError(UserError, FileNotFoundError):
    """An input path that does not exist, or a folder without slices."""


class OutputExistsError(UserError, FileExistsError):
    """An output that exists and may not be replaced."""


class ToolWarning(UserWarning):
    """Something a user should know that does not stop the run (a rounded factor, an input binarised): the
    command line prints it as one ``warning: ...`` line."""


class DamagedFileError(UserError):
    """A file that is cut short or is not what its header says."""

    @classmethod
    def of(cls, path, what: str, detail: str) -> "DamagedFileError":
        """The one message for a damaged file of any format: ``what`` it should be ('TIFF', 'HDF5 file', ...)
        and ``detail``, what the reader said."""
        return cls(f"'{path}' is damaged or not a valid {what} ({detail}). Check that the file was copied "
                   "completely, or export it again.")


def refuse_unwritable(path: Union[str, os.PathLike], what: str = "output") -> None:
    """One error, before any work, for an output path that cannot be written: one under a file (a path that
    names a file as a folder), or under a folder this user may not write to or on a read-only disk (the
    nearest folder that exists decides; missing folders below it are created on writing)."""
    path = Path(path).absolute()
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"Cannot write the {what} '{path}': '{ancestor}' is a file, not a folder. Choose a path in a "
                        "folder.")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UserError(f"Cannot write the {what} '{path}': the folder '{ancestor}' is not writable (no permission, "
                        "or a read-only disk). Choose a folder you may write to.")


@contextlib.contextmanager
def writing_to(path: Union[str, os.PathLike]) -> Iterator[None]:
    """Turn the operating system's refusals while writing ``path`` (no permission, disk full,
    read-only file system) into one :class:`UserError` naming the path and the fix; a partly
    written file is removed, so that it is never mistaken for a result."""
    import errno

    fixes = {errno.EACCES: "choose a folder you may write to", errno.EPERM: "choose a folder you may write to",
             errno.ENOSPC: "free some space or choose another disk", errno.EDQUOT: "free some space (disk quota)",
             errno.EROFS: "choose a writable disk"}
    try:
        yield
    except OSError as error:
        if error.errno not in fixes:
            raise
        with contextlib.suppress(OSError):
            if Path(path).is_file():
                Path(path).unlink()
        raise UserError(f"Cannot write '{path}': {error.strerror or error}. {fixes[error.errno].capitalize()}."
                        ) from error


def format_warning(message: Union[Warning, str], category: type, filename: str, lineno: int,
                   line: Any = None) -> str:
    """A :class:`ToolWarning` as a user reads it, ``warning: ...`` (its source line says nothing to them);
    every other warning (other packages', even where they point at this project's code) as Python prints it."""
    if issubclass(category, ToolWarning):
        return f"warning: {message}\n"
    return _python_format_warning(message, category, filename, lineno, line)


_python_format_warning = warnings.formatwarning


def run_cli(job: Callable[..., Any], *args: Any) -> int:
    """Run a command-line job (``eval.py``, ``apply.py``, ``bench.py``): a :class:`UserError` (bad path,
    damaged file, existing output, bad setting) prints one ``error: ...`` line and gives exit status 2;
    Ctrl-C prints ``interrupted`` and gives 130, as a shell does. Any other exception is a bug and keeps
    its traceback. The project's warnings (:class:`ToolWarning`) print as ``warning: ...``."""
    previous, warnings.formatwarning = warnings.formatwarning, format_warning
    try:
        job(*args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted (Ctrl-C).", file=sys.stderr)
        return 130
    finally:
        warnings.formatwarning = previous
    return 0
