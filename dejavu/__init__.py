"""The `dejavu` command: run a local cluster (`dejavu up`), inspect it, benchmark it."""
