"""Errors that medvl reports to users.

Design choice: every problem caused by the user's input (a corrupt file, a malformed
record, an unknown name) raises :class:`MedvlUserError`. The command line catches it,
prints its message on one line and exits with code 2, without a traceback. Anything else
is a bug in medvl and keeps its traceback.
"""

from __future__ import annotations


class MedvlUserError(Exception):
    """A problem with the user's input: bad file, bad record, unknown name.

    ``exit_code`` is 2 for every user error, following the Unix convention for usage
    errors (argparse uses the same code).
    """

    exit_code = 2

    def __init__(self, message: str, *, path: str | None = None, record: str | None = None):
        self.path = str(path) if path is not None else None
        self.record = record
        where = []
        if self.path:
            where.append(self.path)
        if record is not None:
            where.append(f"record {record}")
        prefix = ": ".join([", ".join(where)]) + ": " if where else ""
        super().__init__(prefix + message)
