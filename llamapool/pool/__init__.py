"""The supervised pool: workers, their engine, the scheduler and the supervisor."""
