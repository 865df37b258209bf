"""The version of cellmnn (one place: the package, its files and its figures all read it)."""
__version__ = "0.1.0"
