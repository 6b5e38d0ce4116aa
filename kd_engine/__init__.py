"""Distillery's knowledge-distillation engine: a pure library (no web, database or queue code).

Entry points: :func:`kd_engine.run.run_job` runs one job spec end to end;
:mod:`kd_engine.registry` lists the KD methods; :mod:`kd_engine.spec` holds the typed job spec.
"""
