"""The silo agent: the daemon pipeline, sharing strategies, in-process simulation and the bench.

Importing the package registers the built-in methods (``fedsilo.silo_agent.methods``), so any
agent-side code (the daemon, a client library user, a benchmark) knows them.
"""

from fedsilo.silo_agent import methods as methods  # noqa: F401 - registers the built-in methods
