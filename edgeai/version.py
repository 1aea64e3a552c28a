"""The package's version: a leaf module, so that writers can stamp files without importing the package's API."""

__version__ = "0.1.0"
