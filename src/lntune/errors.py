"""`InputError`: the base of lntune's errors about what a user gave it (a folder, a file, an option).

Its message is one line naming what was wrong and what to do; the command line prints it as
``lntune <command>: error: <message>`` with exit code 2, without a traceback.
"""

from __future__ import annotations


class InputError(ValueError):
    """Bad input from the user: one line naming the folder, file or option at fault and what to do."""
