from lida_core.cli import run

run()
