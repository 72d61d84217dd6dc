"""One-line reasons for files that ``torch.load(..., weights_only=True)`` refuses.

Every loader of this package reads with ``weights_only=True``: a file that holds pickled code or
objects (a ``__reduce__`` payload, a class instance) is refused before anything in it runs.
Torch's own message spans many lines and suggests ``weights_only=False``, i.e. running the file;
:func:`unpickling_reason` turns it into one line that names what was refused, and
:func:`safe_torch_load` is the read with that error mapping that every checkpoint reader uses.
"""

from __future__ import annotations

import pickle
import re
import struct
import zipfile
from pathlib import Path
from typing import Any

import torch

_GLOBAL = re.compile(r"GLOBAL\s+([\w.]+)")
_OPERAND = re.compile(r"Unsupported operand\s+\d+")


def unpickling_reason(exc: BaseException) -> str:
    """What a refused weights-only load found, in one line (without torch's unsafe advice)."""
    text = str(exc)
    found = _GLOBAL.search(text)
    if found:
        return (f"it holds pickled code or objects ({found.group(1)}), not only tensors and plain containers; "
                "nothing in it was run")
    found = _OPERAND.search(text)
    if found:
        return f"not a torch tensor file ({found.group(0).lower()})"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else type(exc).__name__


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message, or its type name when the message is empty."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def safe_torch_load(path: str | Path, what: str, error_cls: type[Exception],
                    map_location: str | torch.device = "cpu") -> Any:
    """The object stored in ``path``, read with ``torch.load(weights_only=True)``.

    ``what`` names the kind of file for the messages (``"an avsr checkpoint"``). Raises
    ``error_cls`` with a one-line message that starts with ``path``, and no chained traceback:
    ``"<path>: refused as <what>: ..."`` (:func:`unpickling_reason`) when the file holds pickled
    code or objects, ``"<path>: cannot be read as <what> (<first line of the error>)"`` when it is
    missing, unreadable, truncated or not a torch file. Nothing in the file is run.
    """
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise error_cls(f"{path}: refused as {what}: {unpickling_reason(exc)}") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError, IndexError, struct.error) as exc:
        # random bytes read as a legacy (non-zip) pickle raise IndexError or struct.error
        raise error_cls(f"{path}: cannot be read as {what} ({first_line(exc)})") from None
