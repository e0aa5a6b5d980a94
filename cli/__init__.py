"""The ``soups`` command line: the top of the import graph (it may import flows, tasks and soups)."""
