"""GREN: graph-regularized embedding network for weakly-supervised disease localization in chest X-rays.

Importing this package touches no network and loads no weights.
"""

__version__ = "0.1.0"
