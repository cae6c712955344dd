"""Files written by earlier versions of the pack still load bit-identically."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from mixofshow.edlora.format import load_edlora

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures", "pack_v0.1")


def tensor_digest(t) -> list:
    t = t.detach().contiguous()
    return [str(t.dtype), list(t.shape), hashlib.sha256(t.cpu().numpy().tobytes()).hexdigest()[:20]]


def edlora_digest(e) -> dict:
    return {
        "words": e.words,
        "emb": {w: tensor_digest(t) for w, t in e.embeddings.items()},
        "unet": {m: [tensor_digest(p.down), tensor_digest(p.up)] for m, p in sorted(e.unet.items())},
        "text": {m: [tensor_digest(p.down), tensor_digest(p.up)] for m, p in sorted(e.text_encoder.items())},
    }


def fused_digest(fused) -> dict:
    out = {
        "method": fused.method,
        "unet": {k: tensor_digest(v) for k, v in sorted(fused.unet_diffs.items())},
        "text": {k: tensor_digest(v) for k, v in sorted(fused.text_diffs.items())},
        "concepts": [
            [
                e.edlora.name,
                e.edlora.words,
                {w: tensor_digest(t) for w, t in e.edlora.embeddings.items()},
                e.unet_strength,
                e.text_encoder_strength,
            ]
            for e in fused.concepts.entries
        ],
        "settings": fused.settings,
        "drift": fused.drift,
        "base_fingerprint": fused.base_fingerprint,
        "reports": {k: vars(v) for k, v in sorted(fused.stage_reports.items())},
    }
    if fused.stats:
        out["stats"] = {
            stage: {
                "groups": {g: [tensor_digest(v.gram), v.rows] for g, v in sorted(s.groups.items())},
                "layers": {
                    k: [v.group, tensor_digest(v.cross), tensor_digest(v.const), v.rows, v.concepts]
                    for k, v in sorted(s.layers.items())
                },
            }
            for stage, s in sorted(fused.stats.items())
        }
    return out


@pytest.fixture(scope="module")
def expected():
    with open(os.path.join(FIXTURES, "digest.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("name", ["edlora_research.pth", "edlora_main.pth", "edlora.safetensors"])
def test_edlora_files_of_version_0_1_load_identically(expected, name):
    assert edlora_digest(load_edlora(os.path.join(FIXTURES, name))) == expected[name]


@pytest.mark.parametrize("name", ["fused_stats.safetensors", "fused_full.safetensors"])
def test_fused_bundles_of_version_0_1_load_identically(tiny, expected, name):
    from mixofshow.fusion.bundle import load_fused
    from mixofshow.fusion.weights import BaseWeights

    model, clip, _ = tiny
    fused = load_fused(os.path.join(FIXTURES, name), BaseWeights(model, clip))
    assert json.loads(json.dumps(fused_digest(fused))) == expected[name]
