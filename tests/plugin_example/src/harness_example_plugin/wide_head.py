"""An example external method: the backbone with its final hidden state mixed with the embedding.

It exists to prove that a method can live in its own package: it registers itself with the
harness's decorator and states only what differs from the shared backbone.
"""

from dataclasses import dataclass

from harness.core.config import ConfigError, ModelConfig
from harness.core.registry import register
from models.base import DecodeOutput, LanguageModel, TrainOutput, next_token_loss


@dataclass
class WideHeadConfig(ModelConfig):
    embed_mix: float = 0.5  # weight of the input embedding added to the final hidden state

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.embed_mix <= 1.0:
            raise ConfigError(f"WideHeadConfig.embed_mix={self.embed_mix}: must lie in [0, 1]")


@register("wide_head")
class WideHead(LanguageModel):
    """Example plugin: final hidden state plus a share of the input embedding before the head."""

    Config = WideHeadConfig

    def _logits(self, input_ids, cache=None, valid=None):
        d = self.decoder
        offset = 0 if cache is None else cache.length
        positions = d.positions_after(offset, input_ids.shape[0], input_ids.shape[1], input_ids.device)
        x = d.embed(input_ids)
        plan = d.plan(positions, cache=cache, key_valid=valid)
        h = d.norm(d.run_blocks(x, plan)) + self.config.embed_mix * d.norm(x)
        return d.head(h, valid)

    def forward(self, input_ids, targets):
        loss = next_token_loss(self._logits(input_ids), targets)
        return TrainOutput(loss=loss, lm_loss=loss)

    def decode(self, input_ids, cache, valid=None):
        return DecodeOutput(self._logits(input_ids, cache, valid))
