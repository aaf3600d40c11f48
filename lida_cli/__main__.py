from lida_cli.cli import run

run()
