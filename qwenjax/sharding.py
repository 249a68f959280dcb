"""Logical axis names carried by every parameter (`sharding_names` metadata).

Mesh rules that map these names to device-mesh axes live here too once the training issue adds
them; model code only ever names logical axes.
"""

LAYERS = "layers"  # the scanned super-block axis
VOCAB = "vocab"
EMBED = "embed"  # model width D
MLP = "mlp"  # FFN width F
Q_HEADS = "q_heads"
KV_HEADS = "kv_heads"
HEAD_DIM = "head_dim"
GDN_CHANNELS = "gdn_channels"  # flat q|k|v channels of the GDN input projection and conv
GDN_V_HEADS = "gdn_v_heads"
CONV_WIDTH = "conv_width"
