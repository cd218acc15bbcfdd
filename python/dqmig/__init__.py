"""dqmig: a testbed for live-migration throttling."""

__version__ = "0.1.0"
