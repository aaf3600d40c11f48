"""Which exceptions are the user's to fix: the CLI prints them as one line and exits 2."""

from __future__ import annotations


def user_errors() -> tuple[type[BaseException], ...]:
    from lida_core.cli import UserError
    from lida_core.decode import DecodeError
    from lida_core.inputs import InputError
    from lida_core.model import CheckpointError
    from lida_core.query import QueryError
    from lida_core.workspace import WorkspaceError
    from schemas import SchemaError

    errors: tuple[type[BaseException], ...] = (UserError, WorkspaceError, InputError, CheckpointError, DecodeError, SchemaError,
                                                   QueryError)
    try:
        from pipelines.runners import RunnerError

        errors += (RunnerError,)
    except ImportError:  # Beam not installed: the method alone still works
        pass
    return errors
