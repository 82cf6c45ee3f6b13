from mnp.cli import entry_point

entry_point()
