"""The tiny backbone, the per-pass readout and the cutoff schedule."""

from __future__ import annotations

import dataclasses
import numpy as np
import pytest
import torch

from mirage.config import ConfigError, load_config
from mirage.features.backbone import BACKBONES, load_backbone
from mirage.features.inputs import (
    WordSpan,
    cutoff_times,
    n_video_frames,
    video_frame_times,
    word_frame,
    words_before,
)
from mirage.features.readout import PassInputs, PassRunner


@pytest.fixture(scope="module")
def fcfg():
    return load_config("demo").features


@pytest.fixture(scope="module")
def tiny(fcfg):
    return load_backbone(fcfg)


def _inputs(fcfg, n=2, seed=0, words=True):
    rng = np.random.default_rng(seed)
    k = n_video_frames(fcfg)
    videos = [rng.integers(0, 255, (k, 48, 64, 3), dtype=np.uint8) for _ in range(n)]
    audios = [(0.1 * rng.standard_normal(int(fcfg.audio_seconds * fcfg.audio_rate))).astype(np.float32) for _ in range(n)]
    # frame 3 (cutoff 2.0 s) gets two words in its bin; frame 4 gets none of its own
    ws = [WordSpan("hello", 0.4), WordSpan("ross", 1.6), WordSpan("coffee", 1.9)]
    return PassInputs(frames=[3, 4][:n], videos=videos, audios=audios, words=[ws, ws][:n] if words else None)


def test_registry_lists_both_backbones():
    assert set(BACKBONES) == {"tiny", "qwen3-omni"}


def test_tiny_shapes_and_token_ids_from_config(fcfg, tiny):
    t = fcfg.tiny
    assert tiny.n_layers == t.n_layers + 1 and tiny.dim == t.hidden
    cfg = tiny.model.config
    tok = tiny.processor.tokenizer
    assert tiny.video_token_id == cfg.video_token_id == tok.convert_tokens_to_ids("<|video_pad|>")
    assert tiny.audio_token_id == cfg.audio_token_id == tok.convert_tokens_to_ids("<|audio_pad|>")
    # our tiny ids are far from the class defaults (151656 ...): positions cannot come from defaults
    assert tiny.video_token_id < t.vocab_size and len(tok) <= t.vocab_size


def test_tiny_weights_seeded(fcfg, tiny):
    again = load_backbone(fcfg)
    other = load_backbone(fcfg.model_copy(update={"tiny": fcfg.tiny.model_copy(update={"seed": 1})}))
    a, b, c = (next(m.model.model.language_model.parameters()) for m in (tiny, again, other))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_processor_mismatch_with_config_is_refused(tiny):
    bb = dataclasses.replace(tiny, video_token_id=tiny.video_token_id + 1)
    with pytest.raises(ConfigError, match="video_token_id"):
        bb.check_processor()


def test_readout_shapes_and_text_bins(fcfg, tiny):
    runner = PassRunner(tiny, fcfg.rate_hz, fcfg.video_fps)
    out = runner.run(_inputs(fcfg))
    assert out.shape == (2, 3, tiny.n_layers, tiny.dim) and out.dtype == np.float32
    assert np.isfinite(out).all()
    assert np.abs(out[:, :2]).sum(axis=(2, 3)).min() > 0  # vision and audio present in every pass
    assert np.abs(out[0, 2]).sum() > 0  # two words end in frame 3's bin (1.5, 2.0]
    assert np.abs(out[1, 2]).sum() == 0  # no word ends in frame 4's bin (2.0, 2.5]


def test_readout_positions_match_an_independent_forward(fcfg, tiny):
    """Vision = mean of the last grid's video tokens, audio = last audio token, text = word means summed."""
    inp = _inputs(fcfg, n=1)
    got = PassRunner(tiny, fcfg.rate_hz, fcfg.video_fps).run(inp)[0]  # (3, L, D)
    p = tiny.processor
    text = ("<|im_start|>user\n" + p.vision_bos_token + p.video_token + p.vision_eos_token
            + p.audio_bos_token + p.audio_token + p.audio_eos_token)
    enc = p(text=[text], videos=inp.videos, audio=inp.audios, fps=fcfg.video_fps,
            videos_kwargs=dict(tiny.video_kwargs), return_tensors="pt")
    tok = p.tokenizer
    words = [tok(" " + w, add_special_tokens=False)["input_ids"] for w in ("hello", "ross", "coffee")]
    ids = enc["input_ids"][0].tolist()
    starts = []
    for w in words:
        starts.append(len(ids))
        ids += w
    ids += tok("<|im_end|>\n", add_special_tokens=False)["input_ids"]
    input_ids = torch.tensor([ids])
    media = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask")}
    with torch.inference_mode():
        hs = tiny.model.model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                              output_hidden_states=True, **media).hidden_states
    hs = torch.stack(hs, 1)[0]  # (L, S, D)
    cfg = tiny.model.config
    vpos = (input_ids[0] == cfg.video_token_id).nonzero().squeeze(1)
    t, h, w = enc["video_grid_thw"][0].tolist()
    per_grid = h * w // cfg.vision_config.spatial_merge_size ** 2
    assert len(vpos) == t * per_grid and t >= 2
    apos = (input_ids[0] == cfg.audio_token_id).nonzero().squeeze(1)
    vision = hs[:, vpos[-per_grid:]].mean(1)
    audio = hs[:, apos[-1]]
    text = sum(hs[:, s:s + len(w)].mean(1) for s, w in list(zip(starts, words))[1:])  # ross, coffee: bin 3
    torch.testing.assert_close(torch.from_numpy(got[0]), vision, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.from_numpy(got[1]), audio, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.from_numpy(got[2]), text, rtol=1e-4, atol=1e-4)
    # the readout is not just any token: the first grid differs from the last
    assert not torch.allclose(hs[:, vpos[:per_grid]].mean(1), vision)


def test_batched_pass_equals_single_passes(fcfg, tiny):
    runner = PassRunner(tiny, fcfg.rate_hz, fcfg.video_fps)
    inp = _inputs(fcfg)
    inp.words = [inp.words[0], inp.words[0][:1]]  # different prompt lengths: left padding in play
    both = runner.run(inp)
    for b in range(2):
        one = runner.run(PassInputs(frames=[inp.frames[b]], videos=[inp.videos[b]], audios=[inp.audios[b]],
                                    words=[inp.words[b]]))
        np.testing.assert_allclose(both[b], one[0], rtol=1e-3, atol=1e-4)


def test_posthoc_passes_see_one_modality(fcfg, tiny):
    runner = PassRunner(tiny, fcfg.rate_hz, fcfg.video_fps)
    inp = _inputs(fcfg, n=1)
    native = runner.run(inp)[0]
    vision_only = runner.run(PassInputs(frames=inp.frames, videos=inp.videos))[0]
    audio_only = runner.run(PassInputs(frames=inp.frames, audios=inp.audios))[0]
    # causal attention: video tokens come first in both prompts, so vision is the same
    np.testing.assert_allclose(native[0], vision_only[0], rtol=1e-4, atol=1e-5)
    # the audio tokens attend to the video in the native pass only
    assert not np.allclose(native[1], audio_only[1], atol=1e-4)
    assert np.abs(vision_only[1:]).sum() == 0 and np.abs(audio_only[[0, 2]]).sum() == 0


def test_cutoff_schedule(fcfg):
    cut = cutoff_times(np.arange(3), 2.0)
    np.testing.assert_allclose(cut, [0.5, 1.0, 1.5])
    paper = load_config("paper").features
    assert n_video_frames(paper) == 8 and n_video_frames(fcfg) == 4
    times = video_frame_times(np.array([0.5, 10.0]), paper, duration_s=9.0)
    assert times.shape == (2, 8)
    assert times[0].min() == 0.0 and np.all(np.diff(times[1]) >= 0)
    assert times[1].max() <= 9.0  # clipped to the movie
    # frames of a cutoff lie in the last video_seconds before it, at video_fps
    t = video_frame_times(np.array([20.0]), paper, duration_s=60.0)[0]
    np.testing.assert_allclose(np.diff(t), 0.5) and pytest.approx(20.0, abs=0.01) == t[-1]
    assert t[0] >= 20.0 - paper.video_seconds


def test_words_before_and_bins():
    ws = [WordSpan(str(i), 0.3 * (i + 1)) for i in range(10)]  # offsets 0.3 ... 3.0
    got = words_before(ws, 1.5, max_words=3)
    assert [w.text for w in got] == ["2", "3", "4"]  # offsets 0.9, 1.2, 1.5 (ended at or before 1.5)
    assert words_before(ws, 1.5, max_words=0) == []
    assert word_frame(0.0, 2.0) == 0 and word_frame(0.5, 2.0) == 0 and word_frame(0.51, 2.0) == 1
    assert word_frame(1.0, 2.0) == 1


@pytest.mark.parametrize("layout", ["thinker", "full"])
def test_qwen3_omni_loader_reads_a_local_checkpoint(fcfg, tiny, tmp_path, layout):
    """The real loader path (from_pretrained, local files only) on a checkpoint saved from the tiny one."""
    from transformers import Qwen3OmniMoeConfig, Qwen3OmniMoeForConditionalGeneration

    if layout == "thinker":
        tiny.model.save_pretrained(tmp_path)
    else:  # the released layout: a whole Qwen3-Omni model whose thinker we keep
        full = Qwen3OmniMoeForConditionalGeneration(
            Qwen3OmniMoeConfig(thinker_config=tiny.model.config.to_dict(), enable_audio_output=False)
        )
        full.thinker.load_state_dict(tiny.model.state_dict())
        full.save_pretrained(tmp_path)
    tiny.processor.save_pretrained(tmp_path)
    bb = load_backbone(fcfg.model_copy(update={"backbone": "qwen3-omni", "model_id": str(tmp_path)}))
    assert type(bb.model) is type(tiny.model) and bb.name == "qwen3-omni"
    assert (bb.video_token_id, bb.audio_token_id, bb.n_layers, bb.dim) == (
        tiny.video_token_id, tiny.audio_token_id, tiny.n_layers, tiny.dim)
    theirs = dict(tiny.model.state_dict())
    for name, value in bb.model.state_dict().items():
        torch.testing.assert_close(value, theirs[name], rtol=0, atol=0)


def test_qwen3_omni_loader_names_a_missing_checkpoint(fcfg, tmp_path):
    from mirage.errors import ModelLoadError

    missing = tmp_path / "no-such-checkpoint"
    with pytest.raises(ModelLoadError, match="no-such-checkpoint"):
        load_backbone(fcfg.model_copy(update={"backbone": "qwen3-omni", "model_id": str(missing)}))
