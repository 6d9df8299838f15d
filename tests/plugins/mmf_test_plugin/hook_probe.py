"""``hook_probe``: a tiny method on the adapter base that uses every training hook, so the tests can
check the hooks through the real trainer (2 gloo ranks, kill -9 resume) before a method needs them.

* ``configure_optimizer``: SGD (momentum, weight decay) for ``backbone.cnn`` + AdamW for the rest,
  one :class:`~mmf_multilevel.trainers.optim.CompositeOptimizer` under MMF's scheduler;
* ``on_update_start``: the "CNN" stays frozen for the first ``freeze_updates`` updates;
* ``synchronize``: per-rank sums of the pooled region features (a plain tensor, not a buffer: DDP
  would broadcast a buffer from rank 0) are all-reduced into the ``feature_sum`` buffer, so every
  rank holds the statistics of the global batch (as SOHO's dictionary update needs);
* ``log_message``: the update, the epoch and whether the CNN has moved.
"""
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from mmf_multilevel.methods.base import MethodModel, register_method
from mmf_multilevel.methods.batch import text_inputs
from mmf_multilevel.methods.config import MethodConfig
from mmf_multilevel.trainers.optim import CompositeOptimizer


@dataclass
class HookProbeConfig(MethodConfig):
    training_head_type: str = "classification"
    feature_dim: int = 24
    num_labels: int = 8
    freeze_updates: int = 3
    cnn_lr: float = 0.05
    lr: float = 1.0e-3


@register_method
class HookProbe(MethodModel):
    name = "hook_probe"
    config_class = HookProbeConfig
    head_types = ("classification",)

    def build_backbone(self):
        s = self.settings
        backbone = nn.ModuleDict({"cnn": nn.Linear(s.feature_dim, s.hidden_size),
                                  "text": nn.Embedding(s.vocab_size, s.hidden_size)})
        self.register_buffer("feature_sum", torch.zeros(s.feature_dim, dtype=torch.float64))
        self.local_sum = torch.zeros(s.feature_dim, dtype=torch.float64)
        self.initial_cnn = backbone["cnn"].weight.detach().clone()
        return backbone

    def build_head(self, head_type):
        self.classifier = nn.Linear(self.settings.hidden_size, self.settings.num_labels)

    def frozen(self) -> bool:
        return self.progress.update < self.settings.freeze_updates

    def task_forward(self, sample_list):
        text = text_inputs(sample_list, self.name)
        features = sample_list["image_feature_0"].float()
        count = sample_list["image_info_0"]["max_features"].view(-1, 1).clamp(min=1).float()
        pooled = features.sum(1) / count
        if self.training:
            self.local_sum = self.local_sum.to(pooled.device) + pooled.detach().double().sum(0)
        words = self.backbone["text"](text.input_ids) * text.mask.unsqueeze(-1)
        words = words.sum(1) / text.mask.sum(1, keepdim=True).clamp(min=1)
        return {"scores": self.classifier(torch.tanh(self.backbone["cnn"](pooled) + words))}

    # ------------------------------------------------------------------ hooks
    def configure_optimizer(self, config):
        cnn = list(self.backbone["cnn"].parameters())
        rest = [p for n, p in self.named_parameters() if not n.startswith("backbone.cnn.")]
        return CompositeOptimizer({
            "cnn": torch.optim.SGD(cnn, lr=self.settings.cnn_lr, momentum=0.9, weight_decay=5e-4),
            "transformer": torch.optim.AdamW(rest, lr=self.settings.lr, weight_decay=1e-2),
        })

    def synchronize(self, world_size):
        if world_size > 1:
            dist.all_reduce(self.local_sum)
        self.feature_sum += self.local_sum.to(self.feature_sum.device)
        self.local_sum = torch.zeros_like(self.local_sum)
        if self.frozen():  # no gradient, no weight decay, no momentum for the CNN while frozen
            for p in self.backbone["cnn"].parameters():
                p.grad = None

    def log_message(self, progress):
        moved = not torch.equal(self.backbone["cnn"].weight.detach().cpu(), self.initial_cnn.cpu())
        return f"hook_probe: update {progress.update} epoch {progress.epoch} cnn_moved {moved}"
