"""The errors a user can fix: the CLI prints each as one line and exits 2.

`UserError` (bad arguments) and `RunnerError` (runner options that cannot work) are defined
here, so that this module imports no front door (`cli`) and no Beam (`pipelines`).
"""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix; printed as one line, exit code 2."""


class RunnerError(ValueError):
    """Runner options that cannot work."""


def user_errors() -> tuple[type[BaseException], ...]:
    from lida_core.decode import DecodeError
    from lida_core.index import IndexMismatch
    from lida_core.inputs import InputError
    from lida_core.model import CheckpointError
    from lida_core.query import QueryError
    from lida_core.workspace import WorkspaceError
    from schemas import SchemaError

    return (UserError, WorkspaceError, InputError, CheckpointError, DecodeError, SchemaError, QueryError, RunnerError, IndexMismatch)
