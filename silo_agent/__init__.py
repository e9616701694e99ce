"""The silo agent: the daemon pipeline, sharing strategies, in-process simulation and the bench."""
