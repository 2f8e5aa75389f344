"""Encoding datasets: the pipeline, the feature store and the ``encode`` command."""
