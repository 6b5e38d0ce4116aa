"""Checks on uploaded files before they are stored for jobs to use (models: :mod:`.models`)."""
