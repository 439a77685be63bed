"""Scoring: the nightly sweep's decisions (what is new, flags per subject, drift) and the
events a sweep publishes. No Prefect, no Ray.
"""
