"""Image features at prefill: each image encoded once per prompt, placed at its placeholders.

`VisionEncoder.step_inputs` collects, for one packed step, the rows whose tokens are image
placeholders and the matching rows of the images' features (a prefill chunk may cover part of an
image), and the M-RoPE positions of Qwen2-VL-style models. `ModelRunner.forward` then calls the
model with `inputs_embeds` instead of `input_ids`. Steps without image tokens never come here.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel

from hearth.engine.sequence import Sequence
from hearth.engine.types import MultiModalInputs

__all__ = ["MMStep", "VisionEncoder", "is_vision_model"]


def is_vision_model(model: PreTrainedModel) -> bool:
    """Whether the model encodes images (an image-text-to-text checkpoint)."""
    return callable(getattr(model, "get_image_features", None))


@dataclass
class MMStep:
    """A step's image rows: `rows[i]` of the packed step takes row i of the concatenated
    `features`; `rope`: (first row, M-RoPE positions [3][num]) of each chunk of an M-RoPE
    image prompt (the other rows keep their 1-D position on all three axes)."""

    rows: list[int] = field(default_factory=list)
    features: list[torch.Tensor] = field(default_factory=list)  # each [k, hidden]
    rope: list[tuple[int, list[list[int]]]] = field(default_factory=list)


class VisionEncoder:
    """Encodes a prompt's images with the model's vision tower and projector.

    The features of the last `keep` images (by content hash) are kept across requests: an image
    sent again is not encoded again, even where the prefix cache holds only part of its tokens.
    """

    keep = 16

    def __init__(self, model: PreTrainedModel) -> None:
        self.recent: OrderedDict[str, torch.Tensor] = OrderedDict()  # image hash -> features
        self.num_encoded = 0  # images run through the vision tower
        self.model = model
        self.config = model.config
        self.mrope = callable(getattr(getattr(model, "model", None), "get_rope_index", None))
        self.device = next(model.parameters()).device

    @torch.inference_mode()
    def features(self, mm: MultiModalInputs, index: int) -> torch.Tensor:
        """Image `index`'s features [n_i, hidden], encoded on first use and kept on `mm`."""
        cache = mm.cache.setdefault("features", {})
        if index in cache:
            return cache[index]
        digest = mm.hashes[index]
        if digest in self.recent:
            self.recent.move_to_end(digest)
            cache[index] = self.recent[digest]
            return cache[index]
        cache[index] = self.recent[digest] = self._encode(mm, index)
        self.num_encoded += 1
        if len(self.recent) > self.keep:
            self.recent.popitem(last=False)
        return cache[index]

    def _encode(self, mm: MultiModalInputs, index: int) -> torch.Tensor:
        """Run image `index` of `mm` through the vision tower and projector: [n_i, hidden]."""
        data, dev = mm.data, self.device
        grid = data.get("image_grid_thw")  # [N, 3] (Qwen2-VL) or None (LLaVA)
        if grid is not None:
            patches = grid.prod(-1).tolist()  # flattened patches per image
            first = sum(patches[:index])
            pixels = data["pixel_values"][first : first + patches[index]].to(dev)
            out = self.model.get_image_features(pixels, grid[index : index + 1].to(dev))
            feats = torch.cat(list(out.pooler_output))  # [n_i, hidden]
        else:
            pixels = data["pixel_values"][index : index + 1].to(dev)  # [1, 3, H, W]
            out = self.model.get_image_features(
                pixel_values=pixels.to(self.model.dtype),
                vision_feature_layer=self.config.vision_feature_layer,
                vision_feature_select_strategy=self.config.vision_feature_select_strategy,
            )
            pooled = out.pooler_output
            pooled = torch.cat(list(pooled)) if isinstance(pooled, list | tuple) else pooled
            feats = pooled.reshape(-1, pooled.shape[-1])  # [n_i, hidden]
        return feats

    @torch.inference_mode()
    def rope(self, mm: MultiModalInputs) -> tuple[list[list[int]], int]:
        """M-RoPE positions of the prompt [3][L] and the offset of the positions after it."""
        if "rope" not in mm.cache:
            data = mm.data
            ids = data["input_ids"]  # [1, L]
            kwargs = {"image_grid_thw": data.get("image_grid_thw")}
            if "mm_token_type_ids" in data:
                kwargs["mm_token_type_ids"] = data["mm_token_type_ids"]
            positions, deltas = self.model.model.get_rope_index(ids, **kwargs)  # [3, 1, L]
            mm.cache["rope"] = (positions[:, 0].tolist(), int(deltas.reshape(-1)[0]))
        return mm.cache["rope"]

    def position_offset(self, seq: Sequence) -> int:
        """What a position after an M-RoPE prompt adds (0 for other models)."""
        return self.rope(seq.mm)[1] if self.mrope and seq.mm is not None else 0

    def add(self, mm_step: MMStep, seq: Sequence, row: int, start: int, num: int) -> None:
        """Record the image rows of the chunk [start, start + num) of `seq` packed at `row`."""
        mm = seq.mm
        stop = start + num
        for index, (first, size) in enumerate(mm.spans):
            lo, hi = max(start, first), min(stop, first + size)
            if lo >= hi:
                continue
            feats = self.features(mm, index)
            mm_step.rows += range(row + lo - start, row + hi - start)
            mm_step.features.append(feats[lo - first : hi - first])

    def positions3(self, seq: Sequence, start: int, num: int) -> list[list[int]]:
        """The chunk's M-RoPE positions [3][num]: the prompt's, then 1-D plus the offset."""
        positions, delta = self.rope(seq.mm)
        split = len(positions[0])
        tail = [p + delta for p in range(max(start, split), start + num)]
        return [axis[start : min(start + num, split)] + tail for axis in positions]

    def model_inputs(
        self, input_ids: torch.Tensor, kwargs: dict, mm_step: MMStep
    ) -> dict[str, torch.Tensor]:
        """`inputs_embeds` [1, n, hidden] for `input_ids` [1, n] (the token embeddings with
        the image rows replaced) and, for M-RoPE models, `position_ids` [3, 1, n]."""
        embeds = self.model.get_input_embeddings()(input_ids)  # [1, n, hidden]
        if mm_step.rows:
            rows = torch.tensor(mm_step.rows, dtype=torch.long, device=embeds.device)
            feats = torch.cat(mm_step.features).to(embeds.device, embeds.dtype)  # [k, hidden]
            embeds[0].index_copy_(0, rows, feats)
        out = {"inputs_embeds": embeds}
        if mm_step.rope:
            positions = kwargs["position_ids"].expand(3, -1).clone()  # [3, n]
            for row, chunk in mm_step.rope:
                values = torch.tensor(chunk, dtype=torch.long, device=positions.device)
                positions[:, row : row + values.shape[1]] = values  # [3, num]
            out["position_ids"] = positions[:, None, :]  # [3, 1, n]
        return out
