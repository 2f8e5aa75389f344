"""The seed's import paths (``model_factory.*``), kept so its examples run as written."""
