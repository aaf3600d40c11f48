# `python -m lida_core` (CONTRACT.md) runs the command, which lives on the floor above (lida_cli).
from lida_cli.cli import run

run()
