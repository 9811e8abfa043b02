"""What runs inside one trial: models, data, pruners, retraining schedules and the train loop;
and nptm's version (`__version__`), which every package below the driver records too."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("nptm")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"
