"""Planning a sweep and running it on Ray."""
