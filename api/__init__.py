"""Distillery's HTTP API (FastAPI): routers, schemas, the dashboard, auth gates and the one
mapping of domain errors to HTTP statuses. The rules live in :mod:`core`."""
