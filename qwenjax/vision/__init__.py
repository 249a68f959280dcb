"""Vision: image/video preprocessing, the ViT, and the multimodal model.

    qwenjax.vision.config      VisionConfig (HF `vision_config` + image/video token ids)
    qwenjax.vision.preprocess  images / frames → `pixel_values`, `image_grid_thw` (NumPy + PIL)
    qwenjax.vision.encoder     VisionEncoder: the ViT and its 2×2 merger (Flax NNX)
    qwenjax.vision.rope_index  get_rope_index: 3-D mRoPE positions of a multimodal batch
    qwenjax.vision.model       Qwen35VL: the text model with the vision tower

Only the config is imported here: `qwenjax.config` imports it, and the model modules import
`qwenjax.config`.
"""

from qwenjax.vision.config import VisionConfig

__all__ = ["VisionConfig"]
