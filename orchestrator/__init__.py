"""Planning a sweep and running it on Ray."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("nptm")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"
