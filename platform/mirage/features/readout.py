"""One batched backbone pass over several cutoffs, and the per-modality readout.

The prompt of a pass is a user turn holding, in order, the video placeholder, the audio
placeholder and the transcript words; the processor expands the placeholders. Readout positions
come from ``input_ids`` compared with the token ids of the loaded model config:

- vision: the video tokens of the last temporal grid, averaged over space;
- audio: the last audio token;
- text: the tokens of each word averaged, words ending in the pass's 2 Hz bin summed.

Every hidden state is kept (embeddings + each decoder layer).

Two choices differ from the reference extraction on purpose: positions are the model's own
multimodal rotary positions (``get_rope_index``: the audio segment's positions follow the video's
instead of both starting at 0), and word vectors are summed into their bin as the reference does
(a bin with more words carries a larger text vector; none gives zeros).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mirage.features.backbone import Backbone
from mirage.features.inputs import WordSpan, word_frame


@dataclass
class PassInputs:
    """Inputs of ``B`` cutoffs for one pass; a modality left as None is not in the prompt.

    videos: B arrays uint8 (n_video_frames, H, W, 3); audios: B arrays float32 (n_samples,);
    words: B word lists (None = no transcript in the prompt); frames: (B,) feature frame index of
    each cutoff (the text bin).
    """

    frames: list[int]
    videos: list[np.ndarray] | None = None
    audios: list[np.ndarray] | None = None
    words: list[list[WordSpan]] | None = None


class PassRunner:
    """Builds prompts, runs the thinker with all hidden states, reads out vision/audio/text."""

    def __init__(self, backbone: Backbone, rate_hz: float, video_fps: float):
        self.bb = backbone
        self.rate_hz = rate_hz
        self.video_fps = video_fps
        tok = backbone.processor.tokenizer
        self._tok = tok
        self._pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        self._suffix = tok("<|im_end|>\n", add_special_tokens=False)["input_ids"]
        self._word_cache: dict[str, list[int]] = {}

    def _word_ids(self, text: str) -> list[int]:
        ids = self._word_cache.get(text)
        if ids is None:
            ids = self._tok(" " + text.strip(), add_special_tokens=False)["input_ids"]
            if len(self._word_cache) < 100_000:
                self._word_cache[text] = ids
        return ids

    def _prefix(self, inp: PassInputs, n: int) -> tuple[torch.Tensor, dict]:
        """Processor output for the media part of the prompt: ids (B, S0) and model tensors."""
        p = self.bb.processor
        text = "<|im_start|>user\n"
        if inp.videos is not None:
            text += p.vision_bos_token + p.video_token + p.vision_eos_token
        if inp.audios is not None:
            text += p.audio_bos_token + p.audio_token + p.audio_eos_token
        kwargs = {}
        if inp.videos is not None:
            kwargs.update(videos=list(inp.videos), fps=self.video_fps, videos_kwargs=dict(self.bb.video_kwargs))
        if inp.audios is not None:
            kwargs.update(audio=list(inp.audios))
        if kwargs:
            enc = dict(p(text=[text] * n, return_tensors="pt", **kwargs))
        else:
            enc = dict(self._tok([text] * n, return_tensors="pt", add_special_tokens=False))
        ids = enc.pop("input_ids")
        mask = enc.pop("attention_mask")
        if not bool(mask.all()):
            raise RuntimeError("media prompts of one pass differ in length; expected equal windows per cutoff")
        return ids, enc

    @torch.inference_mode()
    def run(self, inp: PassInputs) -> np.ndarray:
        """Features of each cutoff: float32 (B, 3, n_layers, dim), modality order vision, audio, text.

        A modality absent from the inputs is left at zero.
        """
        n = len(inp.frames)
        prefix, media = self._prefix(inp, n)
        rows: list[list[int]] = []
        spans: list[list[tuple[int, int, int]]] = []  # per row: (start, stop, frame) of each word
        for b in range(n):
            row = prefix[b].tolist()
            row_spans = []
            for w in inp.words[b] if inp.words is not None else []:
                ids = self._word_ids(w.text)
                if ids:
                    row_spans.append((len(row), len(row) + len(ids), word_frame(w.offset, self.rate_hz)))
                    row.extend(ids)
            rows.append(row + self._suffix)
            spans.append(row_spans)
        width = max(len(r) for r in rows)
        input_ids = torch.full((n, width), self._pad_id, dtype=torch.long)
        attention = torch.zeros((n, width), dtype=torch.long)
        for b, r in enumerate(rows):  # left padding
            input_ids[b, width - len(r):] = torch.tensor(r)
            attention[b, width - len(r):] = 1
        device = self.bb.device
        model_inputs = {k: v.to(device) for k, v in media.items() if isinstance(v, torch.Tensor)}
        out = self.bb.model.model(
            input_ids=input_ids.to(device),
            attention_mask=attention.to(device),
            output_hidden_states=True,
            use_cache=False,
            **model_inputs,
        )
        hs = torch.stack(out.hidden_states, dim=1)  # (B, L, S, D), model dtype
        feats = torch.zeros((n, 3, self.bb.n_layers, self.bb.dim), dtype=torch.float32)  # (B, 3, L, D)
        ids_dev = input_ids.to(hs.device)
        grid = media.get("video_grid_thw")
        for b in range(n):
            if inp.videos is not None:
                feats[b, 0] = self._vision(hs[b], ids_dev[b], grid[b]).cpu()
            if inp.audios is not None:
                feats[b, 1] = self._audio(hs[b], ids_dev[b]).cpu()
            shift = width - len(rows[b])
            for start, stop, frame in spans[b]:
                if frame == inp.frames[b]:
                    feats[b, 2] += hs[b, :, shift + start: shift + stop].float().mean(dim=1).cpu()  # (L, D)
        return feats.numpy()

    def _vision(self, hs: torch.Tensor, ids: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """Mean over space of the last temporal grid's video tokens. hs (L, S, D) -> (L, D)."""
        pos = torch.nonzero(ids == self.bb.video_token_id).squeeze(1)
        t, h, w = (int(x) for x in grid_thw)
        per_grid = h * w // self.bb.spatial_merge_size**2
        if pos.numel() != t * per_grid:
            raise RuntimeError(f"found {pos.numel()} video tokens, expected {t} grids x {per_grid}")
        return hs[:, pos[-per_grid:]].float().mean(dim=1)

    def _audio(self, hs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Hidden states at the last audio token. hs (L, S, D) -> (L, D)."""
        pos = torch.nonzero(ids == self.bb.audio_token_id).squeeze(1)
        if pos.numel() == 0:
            raise RuntimeError("no audio tokens in the prompt")
        return hs[:, pos[-1]].float()
