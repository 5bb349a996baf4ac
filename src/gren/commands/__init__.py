"""One module per CLI command; see :mod:`gren.cli` for the protocol a command module follows."""
