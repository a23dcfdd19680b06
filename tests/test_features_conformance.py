"""Extraction against the reference's own outputs (../shared/conformance/features_tiny).

A tiny Qwen3-Omni thinker, a 15 s movie and its transcript: our features (native and post-hoc
fusion) must equal the reference's within 1e-4 * max(1, max|ref|) per modality, and every
intermediate (decoded media, pass plan, prompt ids, windows, read-out positions, text bins) must
be the one the reference recorded in debug.json / debug.safetensors.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import features_fixture_cfg


@pytest.fixture(scope="module")
def fx(features_fixture) -> Path:
    return features_fixture


_cfg = features_fixture_cfg


@pytest.fixture(scope="module")
def debug(fx):
    from safetensors.numpy import load_file

    return json.loads((fx / "debug.json").read_text()), load_file(str(fx / "debug.safetensors"))


@pytest.fixture(scope="module")
def backbone(fixture_backbone):
    return fixture_backbone


@pytest.fixture(scope="module")
def plan(fx):
    from mirage.features.extract import plan_stimulus

    return plan_stimulus(fx / "stimulus.mkv", fx / "stimulus.tsv", _cfg(fx).features)


@pytest.fixture(scope="module")
def native(fixture_native_features):
    return fixture_native_features


@pytest.fixture(scope="module")
def posthoc(fx, backbone):
    from mirage.features.one import extract_video

    return extract_video(_cfg(fx, "posthoc"), fx / "stimulus.mkv", fx / "stimulus.tsv", backbone=backbone)


def _assert_matches(got: dict, ref_path: Path) -> None:
    from safetensors.numpy import load_file

    ref = load_file(str(ref_path))
    for m in ("vision", "audio", "text"):
        assert got[m].shape == ref[m].shape, (m, got[m].shape, ref[m].shape)
        assert got[m].dtype == np.float32
        err = float(np.abs(got[m] - ref[m]).max())
        tol = 1e-4 * max(1.0, float(np.abs(ref[m]).max()))
        assert err <= tol, f"{m}: max |ours - reference| = {err:.3g} > {tol:.3g}"


def test_native_features_match_the_reference(native, fx):
    _assert_matches(native, fx / "features.safetensors")


def test_posthoc_features_match_the_reference(posthoc, fx):
    _assert_matches(posthoc, fx / "features_posthoc.safetensors")


def test_fusion_changes_the_features(native, posthoc):
    for m in ("vision", "audio", "text"):
        assert np.abs(native[m] - posthoc[m]).max() > 0.1, m


# ---- decoding -------------------------------------------------------------------


def test_decoded_media_are_the_references(fx, debug):
    from mirage.data.media import MediaReader

    meta, arrays = debug
    with MediaReader(fx / "stimulus.mkv") as m:
        assert m.printed_duration == pytest.approx(meta["stimulus"]["video_duration_s_moviepy"], abs=1e-9)
        audio = m.audio_track(44100, 16000)
        frames = m.frames_by_index(arrays["frames_used_index"])
    assert audio.shape == arrays["audio_16k"].shape
    assert np.abs(audio - arrays["audio_16k"]).max() <= 1e-6
    assert np.array_equal(frames, arrays["frames_used"])


# ---- the pass plan and each pass's inputs ---------------------------------------


def test_pass_plan_and_frame_counts(plan, debug):
    meta, arrays = debug
    assert [p.cutoff for p in plan.passes] == arrays["pass_cutoff_s"].tolist()
    assert plan.frames == {"vision": 30, "audio": 30, "text": meta["stimulus"]["n_text_frames"]}
    assert plan.audio_samples == meta["stimulus"]["audio_samples_16k"]
    for p, ref in zip(plan.passes, meta["passes"], strict=True):
        serves = ref["serves"]
        assert (p.words, p.audio_frame, p.vision_frame) == (
            serves["text_words"], serves["audio_frame"], serves["vision_frame"]
        ), p.cutoff


def test_words_go_to_the_reference_text_frames(plan, debug):
    from mirage.features.inputs import text_frames

    meta, _ = debug
    for w, ref in zip(plan.transcript.words, meta["words"], strict=True):
        assert (w.text, w.onset, w.end) == (ref["word"], ref["onset_s"], ref["end_s"])
        s, n = text_frames(w, plan.frames["text"], 2.0)
        assert [s, s + n] == ref["text_frames"], w


def test_windows_of_every_pass(fx, plan, debug):
    from mirage.features.inputs import audio_range, frame_indices, text_window, video_times

    meta, _ = debug
    cfg = _cfg(fx).features
    for p, ref in zip(plan.passes, meta["passes"], strict=True):
        assert list(audio_range(p.cutoff, cfg, plan.audio_samples)) == ref["audio"]["sample_range"]
        times = video_times(p.cutoff, cfg, plan.vision_s)
        assert times.dtype == np.float32
        assert [float(t) for t in times] == ref["vision"]["frame_times_s"]
        assert frame_indices(times, plan.vision_s, plan.fps).tolist() == ref["vision"]["frame_indices_24fps"]
        window = text_window(plan.transcript, p.cutoff, cfg.max_words).text
        assert ref["prompt"].endswith(window) and ref.get("transcript_window", window) == window


def test_prompt_ids_and_readout_positions_of_every_pass(fx, backbone, plan, debug):
    from mirage.features.inputs import audio_range, text_window
    from mirage.features.readout import PassOutput, PassRunner

    meta, arrays = debug
    cfg = _cfg(fx).features
    runner = PassRunner(backbone, cfg)
    frame_of = {int(k): i for i, k in enumerate(arrays["frames_used_index"])}
    offsets = arrays["pass_offsets"]
    for i, (p, ref) in enumerate(zip(plan.passes, meta["passes"], strict=True)):
        window = text_window(plan.transcript, p.cutoff, cfg.max_words)
        prompt = runner.native_prompt(window)
        assert prompt == ref["prompt"]
        video = arrays["frames_used"][[frame_of[k] for k in ref["vision"]["frame_indices_24fps"]]]
        a0, a1 = audio_range(p.cutoff, cfg, plan.audio_samples)
        enc = runner.encode(prompt, video, arrays["audio_16k"][a0:a1], audio_in_video=True)
        ids = enc["input_ids"][0].numpy()
        assert np.array_equal(ids, arrays["pass_input_ids"][offsets[i]: offsets[i + 1]]), p.cutoff
        out = PassOutput(ids, None, enc["video_grid_thw"].numpy())
        assert runner.audio_position(out, a1 - a0) == ref["audio_readout"]["position"], p.cutoff
        pos = runner.vision_positions(out)
        assert [pos[0], pos[-1]] == ref["vision_readout"]["positions_first_last"], p.cutoff
        for word in ref.get("text_readout", []):
            got = runner.word_positions(out, window, word["word_index"])
            assert got.tolist() == word["positions"], (p.cutoff, word["word"])


def test_one_pass_has_the_reference_hidden_states(fx, backbone, debug):
    """Every hidden state (5 layers x 639 positions) of the native pass at 4.5 s."""
    from mirage.features.inputs import audio_range, text_window
    from mirage.features.readout import PassRunner

    meta, arrays = debug
    cfg = _cfg(fx).features
    runner = PassRunner(backbone, cfg)
    ref = next(p for p in meta["passes"] if p["cutoff_s"] == 4.5)
    frame_of = {int(k): i for i, k in enumerate(arrays["frames_used_index"])}
    video = arrays["frames_used"][[frame_of[k] for k in ref["vision"]["frame_indices_24fps"]]]
    from mirage.features.inputs import read_transcript

    window = text_window(read_transcript(fx / "stimulus.tsv", cfg.transcript_tr), 4.5, cfg.max_words)
    a0, a1 = audio_range(4.5, cfg, len(arrays["audio_16k"]))
    out = runner.run(runner.native_prompt(window), video, arrays["audio_16k"][a0:a1], audio_in_video=True)
    assert np.array_equal(out.input_ids, arrays["input_ids_at_4p5"])
    hs = arrays["hidden_states_at_4p5"]
    assert np.abs(out.hidden.float().cpu().numpy() - hs).max() <= 1e-4 * max(1.0, float(np.abs(hs).max()))


def test_posthoc_prompts(fx, backbone, plan, debug):
    from mirage.features.inputs import text_window
    from mirage.features.readout import PassRunner

    meta, _ = debug
    runner = PassRunner(backbone, _cfg(fx, "posthoc").features)
    refs = meta["posthoc"]["passes"]
    assert len(refs) == meta["posthoc"]["n_passes"] == 87
    by_kind = {"text": [r for r in refs if "transcript_window" in r],
               "audio": [r for r in refs if "audio_readout" in r],
               "vision": [r for r in refs if "vision_readout" in r]}
    assert {k: len(v) for k, v in by_kind.items()} == {"text": 27, "audio": 30, "vision": 30}
    assert {r["prompt"] for r in by_kind["audio"]} == {runner.audio_pad}
    assert {r["prompt"] for r in by_kind["vision"]} == {runner.video_pad}
    for r in by_kind["text"]:
        assert text_window(plan.transcript, r["cutoff_s"], 1024).text == r["prompt"]
