"""The ground floor every rafmedia folder stands on: errors, atomic files, registries, config loading and the
HTML/PNG rendering helpers shared by reports and datasheets.

Nothing here imports another rafmedia folder (`tests/test_architecture.py` keeps it so).
"""
