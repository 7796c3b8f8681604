"""`python -m petals_cli.commands` runs the `petals` CLI."""

from petals_cli.commands.main import main

main()
