"""What users call: serve(), client(), MIIClient, Response (and pipeline)."""
