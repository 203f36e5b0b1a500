"""The ``deepspeed`` engine plugin (AutoTP tensor parallelism)."""
