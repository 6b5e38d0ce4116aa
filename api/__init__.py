"""Distillery's HTTP API (FastAPI): routers do HTTP, the service applies rules, the repository
runs queries."""
