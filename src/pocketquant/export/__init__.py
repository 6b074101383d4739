"""Exports to other runtimes' formats."""
