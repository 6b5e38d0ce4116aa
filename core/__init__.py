"""Distillery's domain core: settings, the database and its records, storage, the job queue,
references and their validation, the job lifecycle, events and the webhook outbox, logging and
domain errors. It imports neither :mod:`api` (HTTP) nor :mod:`worker` (Celery); both import it."""
