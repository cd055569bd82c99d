"""Load generation: workloads (``workloads``), arrival processes (``arrivals``), the streaming
load generator (``runner``), latency statistics (``stats``), simulated-user feedback
(``feedback``) and the A/B helper (``ab``). HTTP only: no sglang, no server runtime."""
