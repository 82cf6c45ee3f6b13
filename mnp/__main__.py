from mnp.entry import entry_point

entry_point()
