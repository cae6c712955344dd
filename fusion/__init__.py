"""Gradient fusion of many ED-LoRAs into one model (Mix-of-Show section 3.3.2) and the weight-fusion baseline."""
