"""Single-client tuning: training one concept's ED-LoRA inside ComfyUI."""
