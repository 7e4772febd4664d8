"""CLI subcommands, one module each, listed in compress.cli.SUBCOMMANDS."""
