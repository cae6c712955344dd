"""Development kit: deterministic random-weight models, ED-LoRA fixtures, a headless-server driver, and the small
world (a synthetic image world, its evaluator, the miniature SD1.x world model and its trained concepts).

Used by the tests, the demo and the benchmarks; never imported by the node pack itself.
"""
