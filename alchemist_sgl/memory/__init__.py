"""Memory: the arbiter that makes training yield to serving, and the status block that reads what is held."""
