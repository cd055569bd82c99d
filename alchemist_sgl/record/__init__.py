"""Recording: the record plan (what to keep per token under a byte budget) and the capture protocol.

``plan.choose_plan`` picks projections by FLOPs saved per byte; ``capture.Capture`` copies their
outputs from prefill forwards into the activation store. Must not import sglang.
"""
