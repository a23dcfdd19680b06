"""The backbone registry: every entry, its tiny variant, its loader and the family keywords."""

from __future__ import annotations

import dataclasses
from typing import get_args

import numpy as np
import pytest
import torch

from mirage.config import ConfigError, FeaturesConfig, load_config
from mirage.errors import ModelLoadError
from mirage.features.backbone import BACKBONES, load_backbone
from mirage.features.families import FAMILIES
from mirage.features.readout import PassRunner


@pytest.fixture(scope="module")
def fcfg():
    return load_config("demo").features


@pytest.mark.parametrize("name", sorted(n for n, e in BACKBONES.items() if e.builds_locally))
def test_tiny_weights_seeded(fcfg, name):
    cfg = fcfg.model_copy(update={"backbone": name})
    one, again = load_backbone(cfg), load_backbone(cfg)
    other = load_backbone(cfg.model_copy(update={"tiny": cfg.tiny.model_copy(update={"seed": 1})}))
    a, b, c = (m.model.get_input_embeddings().weight for m in (one, again, other))
    assert torch.equal(a, b) and not torch.equal(a, c)


# ------------------------------------------------------------------ the registry

ENTRIES = sorted(BACKBONES)
PUBLISHED = sorted(n for n, e in BACKBONES.items() if e.model_id is not None)
TOKEN_ATTRS = {
    "video": "video_token", "audio": "audio_token", "image": "image_token",
    "vision_start": "vision_bos_token", "vision_end": "vision_eos_token",
    "audio_start": "audio_bos_token", "audio_end": "audio_eos_token",
}
AUDIO_TOKENS_PER_S = {"qwen3_omni": 13, "qwen2_5_omni": 25}  # the families' audio encoders at 100 mel frames/s


@pytest.fixture(scope="module")
def tinies(fcfg):
    """Each tiny variant built once: name -> Backbone."""
    built: dict = {}

    def get(name: str):
        if name not in built:
            built[name] = load_backbone(fcfg.model_copy(update={"backbone": name}))
        return built[name]

    return get


@pytest.fixture(scope="module")
def native_passes(fcfg, tinies):
    """One native (audio-in-video) pass of each tiny variant over 4 frames and 31 s of audio."""
    done: dict = {}

    def get(name: str):
        if name not in done:
            bb = tinies(name)
            p = bb.processor
            rng = np.random.default_rng(0)
            video = rng.integers(0, 255, (4, 48, 64, 3), dtype=np.uint8)
            audio = (0.1 * rng.standard_normal(31 * fcfg.audio_rate)).astype(np.float32)
            prompt = p.vision_bos_token + p.video_token + p.vision_eos_token + "\nhello ross"
            enc = p(text=prompt, videos=[video], audio=[audio], fps=fcfg.video_fps, **bb.processor_kwargs(True))
            with torch.inference_mode():
                out = bb.model(**enc, **bb.forward_kwargs(True))
            done[name] = (enc, torch.stack(out.hidden_states))  # (L, 1, S, D)
        return done[name]

    return get


def test_registry_names_are_the_config_choices():
    assert set(BACKBONES) == set(get_args(FeaturesConfig.model_fields["backbone"].annotation))
    assert {e.family for e in BACKBONES.values()} == set(FAMILIES)
    published = {e.model_id for e in BACKBONES.values() if e.model_id is not None and not e.any_checkpoint}
    assert published == {
        "Qwen/Qwen2.5-Omni-3B", "Qwen/Qwen2.5-Omni-7B", "Qwen/Qwen3-Omni-30B-A3B-Instruct",
        "Qwen/Qwen3-Omni-30B-A3B-Thinking", "Qwen/Qwen3-Omni-30B-A3B-Captioner",
    }
    assert BACKBONES["qwen3-omni"].model_id == FeaturesConfig().model_id  # the default stays the paper's


@pytest.mark.parametrize("name", ENTRIES)
def test_entry_tiny_variant_has_the_family_classes_and_tokens(fcfg, tinies, name):
    entry = BACKBONES[name]
    family = FAMILIES[entry.family]
    assert BACKBONES[entry.tiny].builds_locally and BACKBONES[entry.tiny].family == entry.family
    assert entry.builds_locally == (entry.model_id is None) == name.startswith("tiny")
    if entry.model_id is not None:
        assert entry.n_layers > 1 and entry.dim > 0
    bb = tinies(entry.tiny)
    assert bb.family == entry.family and bb.name == entry.tiny
    assert type(bb.model).__name__ == family.thinker_class
    assert type(bb.processor).__name__ == family.processor_class
    assert (bb.n_layers, bb.dim) == (fcfg.tiny.n_layers + 1, fcfg.tiny.hidden)
    tok = bb.processor.tokenizer
    for key, attr in TOKEN_ATTRS.items():
        token = getattr(bb.processor, attr)
        assert token == family.special_tokens[attr]  # the released token strings
        assert bb.token_ids[key] == tok.convert_tokens_to_ids(token) < fcfg.tiny.vocab_size
    assert len(set(bb.token_ids.values())) == len(TOKEN_ATTRS)
    cfg = bb.model.config
    assert (bb.video_token_id, bb.audio_token_id) == (cfg.video_token_id, cfg.audio_token_id)
    assert (bb.token_ids["video"], bb.token_ids["audio"]) == (cfg.video_token_id, cfg.audio_token_id)
    assert cfg.vision_start_token_id == bb.token_ids["vision_start"]  # the rope index reads it


@pytest.mark.parametrize("name", ENTRIES)
def test_entry_tiny_variant_native_pass_interleaves_audio_into_video(fcfg, tinies, native_passes, name):
    entry = BACKBONES[name]
    bb = tinies(entry.tiny)
    enc, hs = native_passes(entry.tiny)
    ids = enc["input_ids"][0].tolist()
    t = bb.token_ids
    start, end = ids.index(t["vision_start"]), ids.index(t["vision_end"])
    assert ids[start + 1] == t["audio_start"] and ids[end - 1] == t["audio_end"]
    media = [i for i, x in enumerate(ids) if x in (t["video"], t["audio"])]
    assert start < min(media) and max(media) < end
    grid = enc["video_grid_thw"][0]
    assert ids.count(t["video"]) == int(grid.prod()) // bb.spatial_merge_size**2
    assert ids.count(t["audio"]) == 31 * AUDIO_TOKENS_PER_S[entry.family]  # longer than Whisper's 30 s, not cut
    assert hs.shape == (bb.n_layers, 1, len(ids), bb.dim) and torch.isfinite(hs).all()


def test_refused_processor_id_names_the_config_field(tinies):
    for name in ("tiny", "tiny-qwen2.5-omni"):
        bb = tinies(name)
        with pytest.raises(ConfigError, match="video_token_id"):
            dataclasses.replace(bb, video_token_id=bb.video_token_id + 1).check_processor()
        ids = dict(bb.token_ids, vision_end=bb.token_ids["vision_end"] + 1)
        with pytest.raises(ConfigError, match="vision end|vision_end"):
            dataclasses.replace(bb, token_ids=ids).check_processor()


def test_start_end_ids_come_from_the_processor_where_the_config_has_none(tinies):
    """A thinker config with only the pad ids (``*_token_index``): the rest are the processor's tokens."""
    from types import SimpleNamespace

    from mirage.features.interface import _special_token_ids

    for name in ("tiny", "tiny-qwen2.5-omni"):
        bb = tinies(name)
        cfg = bb.model.config
        bare = SimpleNamespace(video_token_index=cfg.video_token_id, audio_token_index=cfg.audio_token_id,
                               image_token_index=cfg.image_token_id)
        assert _special_token_ids(bare, bb.processor) == bb.token_ids


def _save_released_layout(tiny, path, layout: str) -> None:
    """Save a tiny thinker as a whole checkpoint (thinker + talker config, talker off) or alone."""
    if layout == "thinker":
        tiny.model.save_pretrained(path)
    else:
        _, _, full_cls = FAMILIES[tiny.family].classes()
        full = full_cls(full_cls.config_class(thinker_config=tiny.model.config.to_dict(), enable_audio_output=False))
        full.thinker.load_state_dict(tiny.model.state_dict())
        full.save_pretrained(path)
    tiny.processor.save_pretrained(path)


@pytest.mark.parametrize("name,layout", [(n, "full") for n in PUBLISHED] + [
    ("qwen3-omni", "thinker"), ("qwen2.5-omni-7b", "thinker")])
def test_published_entry_loads_a_local_checkpoint(fcfg, tinies, tmp_path, name, layout):
    """The real loader (from_pretrained, local files only, CPU float32) on the entry's tiny variant saved to disk."""
    entry = BACKBONES[name]
    tiny = tinies(entry.tiny)
    _save_released_layout(tiny, tmp_path, layout)
    bb = load_backbone(fcfg.model_copy(update={"backbone": name, "model_id": str(tmp_path), "dtype": "bfloat16",
                                               "gpus_per_actor": 1.0}))
    assert type(bb.model) is type(tiny.model) and type(bb.processor) is type(tiny.processor)
    assert bb.name == name and bb.family == entry.family
    assert (bb.token_ids, bb.n_layers, bb.dim) == (tiny.token_ids, tiny.n_layers, tiny.dim)
    assert bb.processor.feature_extractor.chunk_length == tiny.processor.feature_extractor.chunk_length
    gpu = torch.cuda.is_available()
    assert bb.device.startswith("cuda") if gpu else bb.device == "cpu"
    weights = bb.model.state_dict()
    floats = {v.dtype for v in weights.values() if v.is_floating_point()}
    assert torch.bfloat16 in floats if gpu else floats == {torch.float32}  # features.dtype on GPU, float32 on CPU
    theirs = dict(tiny.model.state_dict())
    for key, value in weights.items():
        torch.testing.assert_close(value.cpu(), theirs[key].to(value.dtype), rtol=0, atol=0)


def test_qwen2_5_thinker_without_vision_ids_in_its_config_still_interleaves(fcfg, tinies, tmp_path):
    """A saved thinker config with the pad ids only: start/end ids come from the processor's tokens."""
    import json

    tiny = tinies("tiny-qwen2.5-omni")
    _save_released_layout(tiny, tmp_path, "thinker")
    config = json.loads((tmp_path / "config.json").read_text())
    for key in ("vision_start_token_id", "vision_end_token_id"):
        config.pop(key)
    (tmp_path / "config.json").write_text(json.dumps(config))
    bb = load_backbone(fcfg.model_copy(update={"backbone": "qwen2.5-omni-3b", "model_id": str(tmp_path)}))
    assert bb.token_ids == tiny.token_ids
    p = bb.processor
    rng = np.random.default_rng(2)
    video = rng.integers(0, 255, (2, 48, 64, 3), dtype=np.uint8)
    audio = (0.1 * rng.standard_normal(fcfg.audio_rate)).astype(np.float32)
    enc = p(text=p.vision_bos_token + p.video_token + p.vision_eos_token, videos=[video], audio=[audio],
            fps=fcfg.video_fps, **bb.processor_kwargs(True))
    with torch.inference_mode():
        got = torch.stack(bb.model(**enc, **bb.forward_kwargs(True)).hidden_states)
        want = torch.stack(tiny.model(**enc, **tiny.forward_kwargs(True)).hidden_states)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_loader_refuses_another_entrys_checkpoint(fcfg):
    cfg = fcfg.model_copy(update={"backbone": "qwen2.5-omni-7b", "model_id": "Qwen/Qwen3-Omni-30B-A3B-Thinking"})
    with pytest.raises(ConfigError, match="qwen3-omni-30b-a3b-thinking.*Qwen/Qwen2.5-Omni-7B"):
        load_backbone(cfg)
    cfg = fcfg.model_copy(update={"backbone": "qwen3-omni-30b-a3b-instruct",
                                  "model_id": "Qwen/Qwen3-Omni-30B-A3B-Captioner"})
    with pytest.raises(ConfigError, match="qwen3-omni-30b-a3b-captioner"):
        load_backbone(cfg)


def test_loader_refuses_a_checkpoint_of_the_other_family(fcfg, tinies, tmp_path):
    _save_released_layout(tinies("tiny"), tmp_path, "thinker")
    with pytest.raises(ModelLoadError, match="qwen3_omni_moe_thinker.*qwen2_5_omni"):
        load_backbone(fcfg.model_copy(update={"backbone": "qwen2.5-omni-3b", "model_id": str(tmp_path)}))


def test_loader_names_a_missing_checkpoint(fcfg, tmp_path):
    missing = tmp_path / "no-such-checkpoint"
    for name in ("qwen3-omni", "qwen2.5-omni-3b"):
        with pytest.raises(ModelLoadError, match="no-such-checkpoint"):
            load_backbone(fcfg.model_copy(update={"backbone": name, "model_id": str(missing)}))


def test_qwen3_omni_loads_the_conformance_thinker(fcfg, conformance_dir):
    """``features.model_id=<saved thinker dir>`` with the paper's backbone name, float32 on the CPU
    (``gpus_per_actor=0`` keeps it there even where a GPU is visible)."""
    model_dir = conformance_dir / "features_tiny" / "model"
    if not model_dir.is_dir():
        pytest.skip(f"conformance thinker not found at {model_dir}")
    paper = load_config("paper").features
    cfg = paper.model_copy(update={"model_id": str(model_dir), "dtype": "float32", "gpus_per_actor": 0.0})
    bb = load_backbone(cfg)
    assert bb.family == "qwen3_omni" and bb.name == "qwen3-omni" and (bb.n_layers, bb.dim) == (5, 64)
    assert bb.token_ids == {"image": 3, "video": 4, "audio": 5, "vision_start": 6, "vision_end": 7,
                            "audio_start": 8, "audio_end": 9}  # the fixture README's ids
    assert next(bb.model.parameters()).dtype == torch.float32 and bb.device == "cpu"


@pytest.fixture(scope="module")
def short_movie(tmp_path_factory):
    """A 1.5 s movie (24 fps, 44.1 kHz mono) and a two-row transcript with three words."""
    from mirage.data.synth_media import write_mkv
    from mirage.data.transcripts import Word, write_transcript

    d = tmp_path_factory.mktemp("short_movie")
    rng = np.random.default_rng(1)
    frames = rng.integers(0, 255, (36, 48, 64, 3), dtype=np.uint8)
    audio = (0.1 * rng.standard_normal((1, 3 * 44100 // 2))).astype(np.float32)
    write_mkv(d / "movie.mkv", frames, 24.0, audio, 44100)
    write_transcript(d / "movie.tsv", [[Word("hey", 0.1, 0.4), Word("ross!", 0.6, 1.2)], [Word("okay", 1.6, 1.9)]])
    return d / "movie.mkv", d / "movie.tsv"


@pytest.fixture(scope="module")
def extracted(tinies, short_movie):
    """The project's extraction (``features.one.extract_video``, native fusion) of the short movie, per tiny variant."""
    from mirage.features.one import extract_video

    done: dict = {}

    def get(name: str):
        if name not in done:
            cfg = load_config("demo", [f"features.backbone={name}", "features.fusion=native"])
            done[name] = extract_video(cfg, *short_movie, backbone=tinies(name))
        return done[name]

    return get


@pytest.mark.parametrize("name", ENTRIES)
def test_entry_tiny_variant_through_the_extraction(fcfg, tinies, extracted, name):
    tiny = BACKBONES[name].tiny
    bb, feats = tinies(tiny), extracted(tiny)
    n_media = round(fcfg.rate_hz * 1.5)  # 1.5 s of video and audio
    n_text = round(fcfg.rate_hz * 2 * fcfg.transcript_tr)  # two transcript rows
    assert {m: f.shape for m, f in feats.items()} == {
        "vision": (n_media, bb.n_layers, bb.dim), "audio": (n_media, bb.n_layers, bb.dim),
        "text": (n_text, bb.n_layers, bb.dim)}
    for m, f in feats.items():
        assert f.dtype == np.float32 and np.isfinite(f).all()
    assert (np.abs(feats["vision"]).sum(axis=(1, 2)) > 0).all() and (np.abs(feats["audio"]).sum(axis=(1, 2)) > 0).all()
    has_words = np.abs(feats["text"]).sum(axis=(1, 2)) > 0
    # a word goes into frames [round(2 onset), + max(1, round(2 duration))): hey -> 0, ross! -> 1, okay -> 3
    assert has_words.tolist() == [True, True, False, True, False, False]


# ------------------------------------------------------------------ audio padding


def test_qwen2_5_audio_padded_to_the_longest_clip_gives_the_same_passes(fcfg, tinies, native_passes):
    """The Qwen2.5-Omni processor pads every clip to 300 s; padding to the longest clip plus one FFT
    window leaves the thinker's hidden states bit-identical, native (audio in video) and audio alone."""
    bb = tinies("tiny-qwen2.5-omni")
    p = bb.processor
    enc, hs = native_passes("tiny-qwen2.5-omni")  # the processor's own padding
    rng = np.random.default_rng(0)  # the fixture's inputs, drawn again
    video = rng.integers(0, 255, (4, 48, 64, 3), dtype=np.uint8)
    audio = (0.1 * rng.standard_normal(31 * fcfg.audio_rate)).astype(np.float32)
    prompt = p.vision_bos_token + p.video_token + p.vision_eos_token + "\nhello ross"
    short = p(text=prompt, videos=[video], audio=[audio], fps=fcfg.video_fps, **bb.processor_kwargs(True),
              **bb.audio_kwargs([len(audio)]))
    assert enc["input_features"].shape[-1] == 30000 and short["input_features"].shape[-1] == 3103  # (31 s + 400) / 160, up
    assert torch.equal(short["input_ids"], enc["input_ids"])
    with torch.inference_mode():
        assert torch.equal(torch.stack(bb.model(**short, **bb.forward_kwargs(True)).hidden_states), hs)

    clips = [(0.1 * rng.standard_normal(n)).astype(np.float32) for n in (3 * 16000 + 77, 5 * 16000 + 123, 2 * 16000)]
    prompts = [p.audio_bos_token + p.audio_token + p.audio_eos_token] * 3
    whole = p(text=prompts, audio=clips, **bb.processor_kwargs(False))
    cut = p(text=prompts, audio=clips, **bb.processor_kwargs(False), **bb.audio_kwargs([len(c) for c in clips]))
    with torch.inference_mode():
        a, b = (torch.stack(bb.model(**e, **bb.forward_kwargs(False)).hidden_states) for e in (whole, cut))
    assert torch.equal(a, b)

    runner = PassRunner(bb, fcfg.model_copy(update={"backbone": "tiny-qwen2.5-omni"}))
    assert runner.encode(prompts, audios=clips)["input_features"].shape[-1] == cut["input_features"].shape[-1] < 1000


def test_audio_padding_is_capped_at_the_chunk_and_left_alone_elsewhere(tinies):
    bb = tinies("tiny-qwen2.5-omni")
    fe = bb.processor.feature_extractor
    assert bb.audio_kwargs([fe.n_samples + 5]) == {"audio_kwargs": {"max_length": fe.n_samples}}  # still cut at 300 s
    assert bb.audio_kwargs([16000]) == {"audio_kwargs": {"max_length": 16480}}  # 16000 + 400, rounded up to 160
    assert tinies("tiny").audio_kwargs([16000]) == {}  # Qwen3-Omni pads to the longest clip itself
