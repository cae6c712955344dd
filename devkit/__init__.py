"""Development kit: deterministic random-weight models, ED-LoRA fixtures and a headless-server driver.

Used by the tests, the demo and the benchmarks; never imported by the node pack itself.
"""
