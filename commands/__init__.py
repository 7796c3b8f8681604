"""The `petals` command line (installed as ``petals_cli.commands``): parse, build a config, call the core, render."""
