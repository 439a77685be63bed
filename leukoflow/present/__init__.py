"""Presentation: pages (Jinja2 templates), the report, the dashboard, explanations, and
the formats results leave in (FHIR, Prometheus). A leaf: no other room imports it.
"""
