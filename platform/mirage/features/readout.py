"""One backbone pass: prompt, processor call, forward with every hidden state, and the read-outs.

Prompts are built from the loaded backbone's special tokens (no chat template):

- native fusion: ``<vision_start><video_pad><vision_end>`` then ``"\\n"`` and the transcript window
  (no newline without words); the processor interleaves the audio window into the video block
  (audio in video), and both streams are rope-positioned from the start of the block;
- post-hoc fusion, one modality alone: the window text; ``<audio_pad>``; or ``<video_pad>``.

Read-outs over ``hidden_states`` stacked to (n_layers, seq, dim) in float32 (embeddings + every layer):

- vision: mean over the video tokens of the last temporal grid;
- audio: the audio token at rank ``floor((n - 1) * N / n)`` (see ``inputs.audio_readout_rank``);
- text: per word, the mean over the tokens of the window text whose characters overlap the word;
  the window text is found as the first run of its own token ids (tokenised alone, optionally
  after one of the prefixes "", "\\n", " ", "\\n\\n") in the pass's input ids.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mirage.config import FeaturesConfig
from mirage.features.inputs import TextWindow, audio_readout_rank
from mirage.features.interface import Backbone

TEXT_PREFIXES = ("", "\n", " ", "\n\n")
"""Prefixes tried, in order, when locating the window text among a pass's tokens."""


@dataclass
class PassOutput:
    """What one forward pass produced: input ids (seq,), hidden states (n_layers, seq, dim) on the
    model's device in its dtype (read-outs cast only the positions they keep to float32), and the
    processor's ``video_grid_thw`` rows (None without video)."""

    input_ids: np.ndarray
    hidden: torch.Tensor
    video_grid: np.ndarray | None


class PassRunner:
    """Builds prompts from a backbone's token ids, runs its thinker, reads features out."""

    def __init__(self, backbone: Backbone, cfg: FeaturesConfig):
        self.bb = backbone
        self.cfg = cfg
        tok = backbone.processor.tokenizer
        self._tok = tok
        ids = backbone.token_ids
        names = tok.convert_ids_to_tokens([ids["vision_start"], ids["video"], ids["vision_end"], ids["audio"]])
        self.video_block = names[0] + names[1] + names[2]
        self.video_pad, self.audio_pad = names[1], names[3]

    # ------------------------------------------------------------------ prompts

    def native_prompt(self, window: TextWindow) -> str:
        """Video block (audio goes inside it), then a newline and the window text when there is one."""
        return "\n".join(p for p in (self.video_block, window.text) if p)

    # ------------------------------------------------------------------ passes

    def encode(
        self,
        prompts: str | list[str],
        videos: list[np.ndarray] | np.ndarray | None = None,
        audios: list[np.ndarray] | np.ndarray | None = None,
        audio_in_video: bool = False,
    ) -> dict:
        """The processor's output for one or more sequences: ``input_ids`` (B, seq) and media tensors.

        prompts: one prompt or B; videos: B uint8 (n_frames, H, W, 3) or None; audios: B float32
        (n_samples,) or None (a single array stands for a list of one). Sequences of a batch are
        padded on the tokenizer's side; read-outs locate their tokens per row.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        videos = [videos] if isinstance(videos, np.ndarray) else videos
        audios = [audios] if isinstance(audios, np.ndarray) else audios
        if audio_in_video:
            kwargs = self.bb.processor_kwargs(audio_in_video, n_videos=len(prompts))
        else:
            kwargs = self.bb.processor_kwargs(audio_in_video)
        kwargs.pop("size", None)  # the resize is the processor call's default unless the config sets one
        if self.cfg.video_min_pixels is not None or self.cfg.video_max_pixels is not None:
            kwargs["size"] = {"shortest_edge": self.cfg.video_min_pixels, "longest_edge": self.cfg.video_max_pixels}
        if videos is not None:
            kwargs.update(videos=list(videos), fps=max(1, int(round(self.cfg.video_fps))))
        if audios is not None:
            kwargs["audio"] = list(audios)
            kwargs.update(self.bb.audio_kwargs([len(a) for a in kwargs["audio"]]))
        return dict(self.bb.processor(text=prompts if len(prompts) > 1 else prompts[0], **kwargs))

    def forward(self, enc: dict, audio_in_video: bool) -> list[PassOutput]:
        """The thinker's forward on an :meth:`encode` output, every hidden state kept; one output per row."""
        model = self.bb.model
        dtype = next(model.parameters()).dtype
        inputs = {}
        for k, v in enc.items():
            if isinstance(v, torch.Tensor):
                v = v.to(self.bb.device)
                inputs[k] = v.to(dtype) if v.is_floating_point() else v
        with torch.inference_mode():
            out = model(**inputs, **self.bb.forward_kwargs(audio_in_video))
            hidden = torch.stack(out.hidden_states, dim=0)  # (L, B, S, D), on the model's device
        ids = enc["input_ids"].cpu().numpy().astype(np.int64)  # (B, S)
        grid = enc.get("video_grid_thw")
        grid = None if grid is None else grid.cpu().numpy()  # (B, 3): one video per row
        return [
            PassOutput(input_ids=ids[b], hidden=hidden[:, b], video_grid=None if grid is None else grid[b: b + 1])
            for b in range(len(ids))
        ]

    def run(
        self,
        prompts: str | list[str],
        videos: list[np.ndarray] | np.ndarray | None = None,
        audios: list[np.ndarray] | np.ndarray | None = None,
        audio_in_video: bool = False,
    ) -> PassOutput | list[PassOutput]:
        """Forward passes (see :meth:`encode`): one output for one prompt, a list for a list."""
        outs = self.forward(self.encode(prompts, videos, audios, audio_in_video), audio_in_video)
        return outs[0] if isinstance(prompts, str) else outs

    # ------------------------------------------------------------------ read-outs

    def vision_positions(self, out: PassOutput) -> np.ndarray:
        """Sequence positions of the last temporal grid's video tokens. (tokens_per_grid,) int64."""
        pos = np.flatnonzero(out.input_ids == self.bb.token_ids["video"])
        t, h, w = (int(x) for x in out.video_grid[0])
        per_grid = h * w // self.bb.spatial_merge_size**2
        if pos.size != t * per_grid:
            raise RuntimeError(f"found {pos.size} video tokens, expected {t} grids x {per_grid}")
        return pos[-per_grid:]

    def vision(self, out: PassOutput) -> np.ndarray:
        """Mean over the last temporal grid's video tokens: (n_layers, dim) float32."""
        return _mean_at(out.hidden, self.vision_positions(out))

    def audio_position(self, out: PassOutput, window_samples: int) -> int:
        """Sequence position of the audio token read out for a window of ``window_samples``."""
        pos = np.flatnonzero(out.input_ids == self.bb.token_ids["audio"])
        if pos.size == 0:
            raise RuntimeError("no audio tokens in the pass")
        return int(pos[audio_readout_rank(pos.size, window_samples, self.cfg)])

    def audio(self, out: PassOutput, window_samples: int) -> np.ndarray:
        """Hidden states at the audio read-out token: (n_layers, dim) float32."""
        return _mean_at(out.hidden, np.array([self.audio_position(out, window_samples)]))

    def word_positions(self, out: PassOutput, window: TextWindow, word_index: int) -> np.ndarray:
        """Sequence positions of the tokens of one word of the window text. (n_tokens,) int64."""
        span = window.span_of(word_index)
        if span is None or not window.text:
            return np.zeros(0, np.int64)
        ids = out.input_ids
        for prefix in TEXT_PREFIXES:
            enc = self._tok(prefix + window.text, add_special_tokens=False, return_offsets_mapping=True)
            needle = np.asarray(enc["input_ids"], dtype=np.int64)
            start = _find(ids, needle)
            if start is None:
                continue
            keep = [
                (i, a - len(prefix), b - len(prefix))
                for i, (a, b) in enumerate(enc["offset_mapping"])
                if b > len(prefix) and a < len(prefix) + len(window.text)
            ]
            hits = [i for i, a, b in keep if b > a and b > span[0] and a < span[1]]
            if not hits:  # no token overlaps the word: its own tokens at the end of the window
                n = len(self._tok(" " + window.text[span[0]:span[1]], add_special_tokens=False)["input_ids"])
                hits = [i for i, _, _ in keep][-max(1, n):]
            return start + np.asarray(hits, dtype=np.int64)
        raise RuntimeError(f"transcript window {window.text[:60]!r}... not found among the pass's tokens")

    def word(self, out: PassOutput, window: TextWindow, word_index: int) -> np.ndarray | None:
        """Mean over the word's tokens: (n_layers, dim) float32, None if it has none."""
        pos = self.word_positions(out, window, word_index)
        return _mean_at(out.hidden, pos) if pos.size else None


def _mean_at(hidden: torch.Tensor, positions: np.ndarray) -> np.ndarray:
    """Mean over sequence positions in float32: hidden (L, S, D) -> (L, D) numpy."""
    idx = torch.from_numpy(np.asarray(positions, dtype=np.int64)).to(hidden.device)
    return hidden[:, idx].float().mean(dim=1).cpu().numpy()


def _find(haystack: np.ndarray, needle: np.ndarray) -> int | None:
    """Index of the first occurrence of ``needle`` in ``haystack`` (1-D int arrays), or None."""
    if needle.size == 0 or needle.size > haystack.size:
        return None
    for s in np.flatnonzero(haystack[: haystack.size - needle.size + 1] == needle[0]):
        if np.array_equal(haystack[s: s + needle.size], needle):
            return int(s)
    return None
