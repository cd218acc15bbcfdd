"""dqmig: a testbed for live-migration throttling."""
