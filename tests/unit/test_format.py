"""ED-LoRA files: both original spellings, the wrapper, our safetensors, kohya export, and bad files."""

from __future__ import annotations

import os
import pickle
import zipfile

import pytest
import safetensors.torch
import torch

from mixofshow.edlora import keys
from mixofshow.edlora.format import (
    EDLoRA,
    EDLoRAError,
    LoRAPair,
    load_edlora,
    save_edlora,
    to_kohya_state_dict,
    to_original_state,
)

UNET_MODULES = [
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
    "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_out.0",
]
TEXT_MODULES = ["text_model.encoder.layers.0.self_attn.q_proj", "text_model.encoder.layers.11.self_attn.out_proj"]


def sample_edlora(seed=0, words=("<potter1>", "<potter2>"), layers=16, width=768) -> EDLoRA:
    g = torch.Generator().manual_seed(seed)
    unet = {m: LoRAPair(torch.randn(4, 320, generator=g), torch.randn(320, 4, generator=g)) for m in UNET_MODULES}
    text = {m: LoRAPair(torch.randn(4, 768, generator=g), torch.randn(768, 4, generator=g)) for m in TEXT_MODULES}
    emb = {w: torch.randn(layers, width, generator=g) for w in words}
    return EDLoRA(embeddings=emb, unet=unet, text_encoder=text, name="sample")


def assert_same(a: EDLoRA, b: EDLoRA):
    assert a.words == b.words
    for w in a.words:
        assert torch.equal(a.embeddings[w], b.embeddings[w])
    for section in ("unet", "text_encoder"):
        pa, pb = getattr(a, section), getattr(b, section)
        assert set(pa) == set(pb)
        for m in pa:
            assert torch.equal(pa[m].down, pb[m].down) and torch.equal(pa[m].up, pb[m].up)


@pytest.mark.parametrize("spelling", ["main", "research"])
@pytest.mark.parametrize("wrapped", [True, False])
def test_reads_original_pth_in_both_spellings(tmp_path, spelling, wrapped):
    ed = sample_edlora()
    state = to_original_state(ed, spelling)
    if not wrapped:
        state = state["params"]
    example = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    expected_key = example + (".lora_down.weight" if spelling == "main" else "_lora.down.weight")
    section = (state["params"] if wrapped else state)["unet"]
    assert expected_key in section
    path = tmp_path / "edlora_potter.pth"
    torch.save(state, path)
    loaded = load_edlora(str(path))
    assert_same(loaded, ed)
    assert loaded.concept_name == "<potter1> <potter2>"
    assert loaded.layers == 16 and loaded.width == 768 and loaded.rank == 4


def test_safetensors_round_trip_keeps_word_order_and_tensors(tmp_path):
    ed = sample_edlora(words=("<zeta1>", "<alpha2>"))
    path = save_edlora(ed, str(tmp_path / "c.safetensors"))
    loaded = load_edlora(path)
    assert_same(loaded, ed)
    with safetensors.safe_open(path, "pt") as f:
        meta = f.metadata()
    assert meta["format_name"] == "mixofshow.edlora"
    assert meta["concept_words"] == '["<zeta1>", "<alpha2>"]'
    assert oct(os.stat(path).st_mode & 0o777) != oct(0o600), "files must honour the umask, not mkstemp's 0600"


def test_pth_written_by_pack_reads_back_in_research_spelling(tmp_path):
    ed = sample_edlora(seed=3)
    path = save_edlora(ed, str(tmp_path / "x.pth"), spelling="research")
    raw = torch.load(path, weights_only=True)
    assert any(k.endswith("_lora.up.weight") for k in raw["params"]["unet"])
    assert_same(load_edlora(path), ed)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch exploit-ran",))


def test_malicious_pickle_is_refused_without_running_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    state = to_original_state(sample_edlora())
    state["params"]["payload"] = _Exploit()
    path = tmp_path / "evil.pth"
    torch.save(state, path)
    with pytest.raises(EDLoRAError, match=r"Refused to load 'evil.pth'.*run arbitrary code"):
        load_edlora(str(path))
    assert not (tmp_path / "exploit-ran").exists()


def test_plain_pickle_with_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "old.pth"
    with open(path, "wb") as f:
        pickle.dump({"params": _Exploit()}, f)
    with pytest.raises(EDLoRAError, match="old.pth"):
        load_edlora(str(path))
    assert not (tmp_path / "exploit-ran").exists()


def test_truncated_file_is_named_as_corrupt(tmp_path):
    path = tmp_path / "cut.pth"
    torch.save(to_original_state(sample_edlora()), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(EDLoRAError, match=r"'cut.pth' is not a readable PyTorch file \(corrupt or truncated\?\)"):
        load_edlora(str(path))


def test_random_bytes_and_corrupt_safetensors(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(EDLoRAError, match="junk.pth"):
        load_edlora(str(junk))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\xff" * 64)
    with pytest.raises(EDLoRAError, match=r"'bad.safetensors' is not a readable safetensors file"):
        load_edlora(str(bad))


def test_foreign_files_say_what_they_are(tmp_path):
    kohya = tmp_path / "style.safetensors"
    safetensors.torch.save_file(to_kohya_state_dict(sample_edlora()), str(kohya))
    with pytest.raises(EDLoRAError, match="standard \\(kohya\\) LoRA; load it with ComfyUI's LoraLoader"):
        load_edlora(str(kohya))
    ckpt = tmp_path / "model.pth"
    torch.save({"state_dict": {"model.diffusion_model.x.weight": torch.zeros(1)}, "epoch": 1}, ckpt)
    with pytest.raises(EDLoRAError, match="full Stable Diffusion checkpoint"):
        load_edlora(str(ckpt))
    zipfile.ZipFile(tmp_path / "z.pth", "w").close()
    with pytest.raises(EDLoRAError, match="z.pth"):
        load_edlora(str(tmp_path / "z.pth"))


def test_structural_problems_name_the_key(tmp_path):
    def write(mutate, name):
        state = to_original_state(sample_edlora())
        mutate(state["params"])
        path = tmp_path / name
        torch.save(state, path)
        return str(path)

    module = UNET_MODULES[0]
    with pytest.raises(EDLoRAError, match=f"module '{module}' has no lora up tensor"):
        load_edlora(write(lambda p: p["unet"].pop(f"{module}.lora_up.weight"), "noup.pth"))
    with pytest.raises(EDLoRAError, match="'weird.key', which is not a LoRA tensor key"):
        load_edlora(write(lambda p: p["unet"].__setitem__("weird.key", torch.zeros(1)), "weird.pth"))
    with pytest.raises(EDLoRAError, match=r"concept word 'potter' is not of the form <name>"):
        load_edlora(write(lambda p: p["new_concept_embedding"].__setitem__("potter", torch.zeros(16, 768)), "word.pth"))
    with pytest.raises(EDLoRAError, match=r"embedding of <bad1> has shape \(4, 768\)"):
        load_edlora(write(lambda p: p["new_concept_embedding"].__setitem__("<bad1>", torch.zeros(4, 768)), "shape.pth"))
    with pytest.raises(EDLoRAError, match="no concept embeddings"):
        load_edlora(write(lambda p: p["new_concept_embedding"].clear(), "empty.pth"))
    with pytest.raises(EDLoRAError, match="mismatched LoRA shapes"):
        load_edlora(write(lambda p: p["unet"].__setitem__(f"{module}.lora_up.weight", torch.zeros(320, 8)), "rank.pth"))
    with pytest.raises(EDLoRAError, match="does not exist"):
        load_edlora(str(tmp_path / "missing.pth"))


def test_kohya_export_names_and_scale():
    ed = sample_edlora()
    sd = to_kohya_state_dict(ed)
    name = "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_out_0"
    assert torch.equal(sd[f"{name}.lora_up.weight"], ed.unet[UNET_MODULES[2]].up)
    assert float(sd[f"{name}.alpha"]) == 4.0  # alpha == rank: ComfyUI scale alpha/rank = 1, as in ED-LoRA
    assert "lora_te_text_model_encoder_layers_11_self_attn_out_proj.lora_down.weight" in sd
    assert not any("embedding" in k for k in sd)
    assert len(sd) == 3 * (len(UNET_MODULES) + len(TEXT_MODULES))


def test_key_helpers():
    assert keys.split_lora_key("a.b.to_out.0_lora.up.weight") == ("a.b.to_out.0", "up")
    assert keys.split_lora_key("a.b.to_q.lora_down.weight") == ("a.b.to_q", "down")
    assert keys.split_lora_key("a.b.to_q.weight") is None
    assert keys.is_cross_attention_kv("x.attn2.to_k") and not keys.is_cross_attention_kv("x.attn1.to_k")


def test_delta_has_no_rank_division():
    pair = LoRAPair(down=torch.full((4, 3), 0.5), up=torch.ones(2, 4))
    assert torch.allclose(pair.delta(), torch.full((2, 3), 2.0))
