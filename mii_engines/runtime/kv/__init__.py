"""KV-cache states behind one interface: dynamic, slots (static), paged."""
