"""Transport-agnostic routing: replica health, the serving rule, schedulers, replica stats."""
