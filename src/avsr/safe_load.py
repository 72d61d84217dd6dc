"""One-line reasons for files that ``torch.load(..., weights_only=True)`` refuses.

Every loader of this package reads with ``weights_only=True``: a file that holds pickled code or
objects (a ``__reduce__`` payload, a class instance) is refused before anything in it runs.
Torch's own message spans many lines and suggests ``weights_only=False``, i.e. running the file;
:func:`unpickling_reason` turns it into one line that names what was refused.
"""

from __future__ import annotations

import re

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
