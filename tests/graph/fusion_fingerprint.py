"""Run by test_fusion_graph in a subprocess: prints a hash of a small gradient fusion's weights."""

import hashlib
import importlib.util
import os
import sys

root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
spec = importlib.util.spec_from_file_location("_mos_bootstrap", os.path.join(root, "devkit", "bootstrap.py"))
bootstrap = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bootstrap)
bootstrap.setup_comfy()
bootstrap.load_pack()

from mixofshow.devkit.models import make_edlora, tiny_sd1  # noqa: E402
from mixofshow.edlora.concepts import ConceptEntry, ConceptSet  # noqa: E402
from mixofshow.fusion.procedure import gradient_fusion  # noqa: E402
from mixofshow.fusion.results import FusionSettings  # noqa: E402


def fusion_hash() -> str:
    model, clip, _ = tiny_sd1(seed=0)
    concepts = ConceptSet()
    for i in range(2):
        concepts = concepts.add(
            ConceptEntry(make_edlora(model, clip, words=(f"<h{i}a>", f"<h{i}b>"), seed=30 + i, name=f"h{i}"), 1.0, 1.0)
        )
    settings = FusionSettings(text_encoder_iters=20, unet_iters=10, sample_steps=2, sample_resolution=128, seed=3)
    fused = gradient_fusion(model, clip, concepts, settings, measure_drift=False)
    digest = hashlib.sha256()
    for diffs in (fused.text_diffs, fused.unet_diffs):
        for key in sorted(diffs):
            digest.update(key.encode())
            digest.update(diffs[key].numpy().tobytes())
    return digest.hexdigest()


if __name__ == "__main__":
    print("FUSION-HASH", fusion_hash())
    sys.stdout.flush()
