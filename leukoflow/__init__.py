"""leukoflow: screening blood-cell microscopy for acute lymphoblastic leukemia."""

__version__ = "0.1.0"
