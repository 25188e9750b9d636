"""The builder's layer names, known without building (no TensorFlow import)."""

from tf_effitrain.config.schema import ModelConfig

__all__ = ["named_layers"]


def named_layers(cfg):
    """The names the builder gives its layers for `cfg`, without building (no TensorFlow
    work): for checking user-given layer names before a run starts. None for
    `bert_backbone` (keras-hub names its own layers)."""
    if isinstance(cfg, dict):
        cfg = ModelConfig(**cfg)
    if cfg.kind != "transformer":
        return None
    names = ["token_ids", "padding_mask", "token_embedding", "position_embedding",
             "embedding_dropout", "pooling", "logits"]
    if cfg.embedding_rank:
        names.append("embedding_projection")
    if cfg.norm_position == "pre":
        names.append("final_norm")
    prefixes = ["shared_block"] if cfg.share_layers else [
        f"block{i}" for i in range(cfg.num_layers)]
    roles = ["query", "attention", "attention_output", "ffn_inner", "ffn_output",
             "attention_norm", "ffn_norm"] + (["key_value"] if cfg.shared_kv else
                                              ["key", "value"])
    return names + [f"{p}_{r}" for p in prefixes for r in roles]
