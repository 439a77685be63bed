"""The store: locations with one compare-and-swap, the Parquet tables, the model registry
and its file format, the lease, pseudonyms, run records and status. No Prefect, no Ray,
nothing from learning.
"""
