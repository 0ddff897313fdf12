"""3-D rotary positions (M-RoPE) of the Qwen2-VL family, computed once per prompt at preprocessing time.

Text tokens advance one position per token in all three rows. A media item at text position p with an LLM grid
(t, h, w) (after spatial merging) gets rows (p + t_index * time_interval, p + h_index, p + w_index); the text
after it resumes at p + max(h, w) (Qwen2/2.5/3-VL, however far a video's time steps reach), or, with
`resume_past_max` (Qwen3-Omni), one past the largest position of the item. An item without a grid (Qwen3-Omni's
audio) runs in time like text: one position per token in all three rows.
"""

from __future__ import annotations

import torch

from mmserve.multimodal.inputs import MultimodalItem


def mrope_positions(prompt_len: int, items: list[MultimodalItem], llm_grids: list[tuple[int, int, int] | None],
                    time_intervals: list[float], resume_past_max: bool = False) -> tuple[torch.Tensor, int]:
    """([3, prompt_len] positions, delta) where a token at index i >= prompt_len has position i + delta."""
    rows: list[torch.Tensor] = []
    pos, cursor = 0, 0
    for item, grid, interval in sorted(zip(items, llm_grids, time_intervals, strict=True), key=lambda x: x[0].offset):
        text = item.offset - cursor
        rows.append(torch.arange(pos, pos + text).expand(3, -1))
        pos += text
        if grid is None:
            rows.append(torch.arange(pos, pos + item.length).expand(3, -1))
            pos += item.length
        else:
            t, h, w = grid
            tt = (torch.arange(t) * interval).long()
            grid_t, grid_h, grid_w = torch.meshgrid(tt, torch.arange(h), torch.arange(w), indexing="ij")
            rows.append(torch.stack([grid_t, grid_h, grid_w]).reshape(3, -1) + pos)
            pos = int(rows[-1].max()) + 1 if resume_past_max else pos + max(h, w)
        cursor = item.end
    rows.append(torch.arange(pos, pos + prompt_len - cursor).expand(3, -1))
    positions = torch.cat(rows, dim=1)
    return positions, int(positions.max()) + 1 - prompt_len
