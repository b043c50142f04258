"""The one exception type for bad input.

Every problem a user can cause (a corrupt image, a missing label, a config typo, a checkpoint of the wrong
layout) raises `InputError` with a message that names the file or the field. The command line turns it into one
line on stderr and exit status 2.
"""

from __future__ import annotations

__all__ = ["InputError"]


class InputError(Exception):
    """Bad input from the user; the message names the file or the field at fault."""
