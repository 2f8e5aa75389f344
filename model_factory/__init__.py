"""The seed's import paths (``model_factory.*``), kept so the original product document's examples run as written."""
