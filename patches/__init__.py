"""Stand-ins and guards for sglang==0.5.23, active only for CPU runs (see README.md here)."""
