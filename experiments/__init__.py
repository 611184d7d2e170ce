"""The command-line scripts: absl flags only; each calls one library function."""
