"""What every alignment-stage defence (Booster, T-Vaccine, RepNoise) shares: it acts while our
alignment stage builds its own aligned artifact; run as the fine-tuning method it is plain SFT
and only checks that the start model was aligned by the same defence, so that cells are named
after the defence:  python run.py method=<name> method@alignment.method=<name> model.align=true
"""

from __future__ import annotations

from omegaconf import OmegaConf

from cwac.alignment import alignment_training
from cwac.api import LossOutput, Method
from cwac.schema import ConfigError


class AlignmentStageMethod(Method):
    stages = ("align", "finetune")
    #: the method's registered name (conf/method/<name>.yaml)
    name: str = ""
    #: why the alignment stage refuses ZeRO-3
    zero3_reason: str = "it has not been tested there"

    @classmethod
    def check_config(cls, node, cfg, key, stage) -> None:
        """Fine-tuning: the start model is our alignment stage's, aligned by this same defence.
        Alignment stage: not under ZeRO-3 (``zero3_reason``); then ``check_values``."""
        label = cls.__name__
        if stage == "finetune":
            if not cfg.model.align or cfg.alignment.method.name != cls.name:
                raise ConfigError(f"config method={cls.name} with method@alignment.method={cfg.alignment.method.name} "
                                  f"model.align={str(bool(cfg.model.align)).lower()}: {label} acts in the alignment "
                                  f"stage; fine-tuning is plain SFT on a {label}-aligned model. Run `python run.py "
                                  f"method={cls.name} method@alignment.method={cls.name} model.align=true` "
                                  f"(our alignment stage)")
            return
        zero = int(alignment_training(cfg).zero_stage)
        if zero >= 3:
            own = OmegaConf.select(cfg, "alignment.training.zero_stage") is not None
            src = "alignment.training.zero_stage" if own else "training.zero_stage"
            raise ConfigError(f"config {src}={zero}: {label} is not supported under ZeRO-3 ({key}={cls.name}): "
                              f"{cls.zero3_reason}; train its alignment stage with {src} <= 2")
        cls.check_values(node, key)

    @classmethod
    def check_values(cls, node, key: str) -> None:
        """The value ranges of the defence's own keys (alignment stage only)."""

    @property
    def aligning(self) -> bool:
        return self.ctx.stage == "align"

    def compute_loss(self, model, batch: dict, step: int) -> LossOutput:   # fine-tuning: plain SFT
        return super().compute_loss(model, batch, step)

    def record_info(self) -> dict:
        if not self.aligning:   # what acted is the alignment stage's node, not this one
            node = OmegaConf.to_container(self.ctx.alignment.method, resolve=True)
            return {"stage": "finetune", "note": "fine-tuning is plain SFT", "alignment_method": node}
        return {"stage": "align", **self.align_info()}

    def align_info(self) -> dict:
        return {}
