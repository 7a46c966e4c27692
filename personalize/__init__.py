"""personalize: an MLOps platform for predictive personalization.

The packages beside this one hold the stages: ``features`` (contracts, loaders, feature and label definitions),
``training``, ``serving`` and ``monitoring``. This package holds what they share: settings, errors and the CLI.
"""

__version__ = "0.1.0"
