"""Pre-copy live migration: parameters, the stream, the source and the destination."""
