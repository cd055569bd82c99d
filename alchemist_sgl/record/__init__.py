"""Recording: the capture protocol that copies planned projection outputs into the store.

``capture.Capture`` copies the outputs the record plan chooses (``core/plan.py``: all four
projections by default, a named subset or a byte budget on request) from prefill forwards into the
activation store; ``export`` reads a request's recording back out. Must not import sglang.
"""
