"""Filters for the pipeline; each module registers its class in mailgate.pipeline.FILTERS."""
