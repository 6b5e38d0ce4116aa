"""Distillery's Celery worker: claims jobs from the database and runs the KD engine."""
