"""Recording: the record plan (which projections to keep per token) and the capture protocol.

``plan.choose_plan`` records all four projections by default (a named subset or a byte budget on
request); ``capture.Capture`` copies their outputs from prefill forwards into the activation
store. Must not import sglang.
"""
