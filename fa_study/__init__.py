"""fa_study: audit biologically plausible learning rules against backpropagation.

The mechanism lives here (models, feedback layers, learning rules, every reading of a trained
network in ``diagnostics``, experiments, plots and widgets); the numbered notebooks in
``notebooks/`` tell the story. See the README for the two commands (``make study``, ``make test``).
"""
from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("fa_study")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+local"

from . import config, data  # noqa: E402,F401
