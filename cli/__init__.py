"""The command line and the demo: the top floor, which may use every package below it."""
