"""leukoflow: screening blood-cell microscopy for acute lymphoblastic leukemia."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("leukoflow")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
