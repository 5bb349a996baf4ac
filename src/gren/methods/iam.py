"""``iam``: iterative attention mining (Cai et al., MICCAI 2018; arXiv:1807.00958).

Only the abstract is known and no code exists (notes/peers.md section 5); this is its most defensible
reading, every choice a config key (``iam.*``):

* **Round 0** (stage ``round0``, ``train.epochs`` epochs): a classifier with multi-scale aggregation
  (:class:`MSANet`): 1 x 1 conv + BN on the backbone's C3, C4 and C5 to ``iam.channels`` (512), upsampled
  bilinearly to the C3 grid (stride 8) and summed; LSE pooling (``iam.lse_r`` 10) or average pooling
  (``iam.pool``); a linear layer -> 14; Wang et al.'s weighted cross-entropy (:func:`gren.methods.cam.weighted_bce`).
  ``iam.msa=false`` keeps C5 alone (the ablation).
* **Rounds t = 1..T** (``iam.rounds`` = T = 2; stages ``round1``..; ``iam.round_epochs`` epochs each, by
  default ``ceil(train.epochs / 3)``, at ``optim.lr x iam.round_lr_factor`` (0.1): fine-tuning): each round
  starts from the previous round's weights. At its start (``on_stage_start``) the network is snapshotted
  (frozen, eval mode) as round t-1. Each training step erases the mined regions of the batch's films:
  snapshot 0 looks at the original film, snapshot k at the film with the regions of snapshots 0..k-1
  erased ("the erased region grows"); a snapshot's region is where the maximum over the image's positive
  classes of its min-max normalised CAMs (bilinearly upsampled to the input) exceeds ``iam.erase_threshold``
  (0.6, the middle of the 0.5-0.7 range); erased pixels take the film's mean intensity. Images without
  a positive label are not erased. The loss is ``BCE(model_t(erased), y) + iam.kp_weight (1.0)
  ||sigmoid(model_t(x)) - sigmoid(model_0(x))||^2`` -- the knowledge-preservation term on the *original*
  films against round 0 (the squared norm over the 14 outputs, mean over images), parts ``bce``, ``kp``.
  The student sees the erased and the original films as one batch (batch norm statistics over both); the
  snapshots use their running statistics, so KP is exactly 0 for an unchanged network in eval mode. The
  erasure happens inside ``forward`` (training steps only), never in ``localize``.
* **Test**: every round's network (the snapshots and the final one) on the original film; the maps are
  the pixel-wise maximum of their min-max normalised CAMs (bias-free, on the C3 grid), positive above
  ``iam.threshold`` (180 / 255, Wang's CAM rule; ``eval_rules`` adds Wang's box rule); image scores are
  the mean of the rounds' sigmoid outputs.

State: the snapshots are frozen sub-modules (their weights in the checkpoint), the number taken is
``extra_state()["rounds_done"]``, so a resume inside any round continues with the same snapshots and a
restored run fuses the same rounds. Cost per training step of round t: one frozen forward per snapshot
plus a student step on twice the batch, about ``(t + 6) / 3`` baseline steps (measured 2.3x and 2.6x for
rounds 1 and 2, round 0 1.15x, in a quiet run); with the default epochs (9, 3, 3) the whole schedule comes
to about 2.8-2.9x the baseline's 9 epochs, within (rounds + 1) = 3x (benchmarks/results/ham_iam.md).
Backbones: the torchvision ResNets (the three levels are read from ``layer2..layer4``).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from gren.core.errors import GrenError
from gren.methods.cam import weighted_bce
from gren.methods.maps import class_activation_maps, lse_pool, minmax_normalize
from gren.methods.protocol import Localization, Method, Stage, TrainContext, total_of
from gren.methods.registry import register_method
from gren.models.backbone import ResNetBackbone, backbone_from_config

POOLS = ("lse", "avg")


class MSANet(nn.Module):
    """Backbone + multi-scale aggregation + linear classifier.

    ``forward(images (B, 1, S, S)) -> (logits (B, K), activations (B, D, S / 8, S / 8))`` where the
    activations are the sum of the 1 x 1 conv + BN projections of C3, C4, C5 (C5 alone without ``msa``,
    then at the backbone's own stride) upsampled to the C3 grid.
    """

    def __init__(self, model_cfg: dict, channels: int, msa: bool, pool: str, lse_r: float):
        super().__init__()
        self.backbone = backbone_from_config(model_cfg)
        if not isinstance(self.backbone, ResNetBackbone):
            raise GrenError(f"iam reads the C3/C4/C5 levels of a torchvision ResNet; model.backbone="
                            f"{model_cfg['backbone']!r} is not one (choose resnet18, resnet34 or resnet50)")
        top = self.backbone.out_channels
        levels = (top // 4, top // 2, top) if msa else (top,)
        self.msa = msa
        self.lateral = nn.ModuleList(nn.Sequential(nn.Conv2d(c, channels, 1, bias=False), nn.BatchNorm2d(channels))
                                     for c in levels)
        self.classifier = nn.Linear(channels, int(model_cfg["num_classes"]))
        self.pool, self.lse_r = pool, lse_r

    def levels(self, images: torch.Tensor) -> list[torch.Tensor]:
        b = self.backbone
        x = b.maxpool(b.relu(b.bn1(b.conv1(b.input_normalization(images)))))
        c3 = b.layer2(b.layer1(x))
        c4 = b.layer3(c3)
        c5 = b.layer4(c4)
        return [c3, c4, c5] if self.msa else [c5]

    def activations(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 1, S, S)`` -> aggregated activations ``(B, D, h, w)`` (the C3 grid with ``msa``)."""
        features = self.levels(images)
        grid = features[0].shape[-2:]
        total = None
        for lateral, feature in zip(self.lateral, features):
            projected = lateral(feature)
            if projected.shape[-2:] != grid:
                projected = F.interpolate(projected, size=grid, mode="bilinear", align_corners=False)
            total = projected if total is None else total + projected
        return total

    def pooled(self, activations: torch.Tensor) -> torch.Tensor:
        activations = activations.float()
        return lse_pool(activations, self.lse_r) if self.pool == "lse" else activations.mean(dim=(2, 3))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        activations = self.activations(images)
        return self.classifier(self.pooled(activations)), activations

    def normalized_cams(self, activations: torch.Tensor) -> torch.Tensor:
        """Min-max normalised bias-free CAMs ``(B, K, h, w)`` in [0, 1] from ``activations (B, D, h, w)``."""
        return minmax_normalize(class_activation_maps(activations.float(), self.classifier.weight))


@register_method("iam")
class IterativeAttentionMining(Method):
    """Cai et al. 2018 (IAM): MSA classifier, then rounds trained on mined-and-erased films with a KP loss."""

    needs = frozenset({"image", "labels"})
    eval_rules = ("wang",)
    defaults = {"iam": {
        "rounds": 2,  # T, attention-mining rounds after round 0 (stages: T + 1)
        "round_epochs": None,  # epochs of each mining round; null = ceil(train.epochs / 3)
        "round_lr_factor": 0.1,  # mining rounds fine-tune at optim.lr x this
        "erase_threshold": 0.6,  # tau: erase where a positive class's normalised CAM > tau
        "kp_weight": 1.0,  # lambda_KP of the knowledge-preservation term
        "channels": 512,  # D, the common width of the aggregated levels
        "msa": True,  # multi-scale aggregation of C3/C4/C5 (false: C5 only)
        "pool": "lse",  # lse | avg
        "lse_r": 10.0,
        "threshold": 0.70588,  # test: a cell is positive above this fraction of the fused map (180 / 255)
    }}

    def __init__(self, config: dict):
        super().__init__(config)
        cfg = config["iam"]
        if cfg["pool"] not in POOLS:
            raise GrenError(f"iam.pool must be one of {', '.join(POOLS)}, got {cfg['pool']!r}")
        if int(cfg["rounds"]) < 0:
            raise GrenError(f"iam.rounds must be >= 0, got {cfg['rounds']}")
        for key in ("erase_threshold", "threshold"):
            if not 0.0 <= float(cfg[key]) < 1.0:
                raise GrenError(f"iam.{key} must be in [0, 1), got {cfg[key]}")
        self.net = MSANet(config["model"], int(cfg["channels"]), bool(cfg["msa"]), str(cfg["pool"]), float(cfg["lse_r"]))
        self.snapshots = nn.ModuleList(copy.deepcopy(self.net) for _ in range(int(cfg["rounds"])))
        self.snapshots.requires_grad_(False)
        self.snapshots.eval()
        self.erase_threshold = float(cfg["erase_threshold"])
        self.kp_weight = float(cfg["kp_weight"])
        self.threshold = float(cfg["threshold"])
        self.rounds_done = 0  # snapshots taken = the current round's index (extra_state)

    def train(self, mode: bool = True):
        super().train(mode)
        self.snapshots.eval()  # frozen rounds always use their running statistics
        return self

    # -- stages -------------------------------------------------------------------------------------------
    def stages(self, config: dict) -> list[Stage]:
        cfg = config["iam"]
        epochs = int(config["train"]["epochs"])
        round_epochs = cfg["round_epochs"]
        round_epochs = max(1, math.ceil(epochs / 3)) if round_epochs is None else int(round_epochs)
        if round_epochs < 0:
            raise GrenError(f"iam.round_epochs must be null or >= 0, got {round_epochs}")
        lr = float(config["optim"]["lr"]) * float(cfg["round_lr_factor"])
        return [Stage("round0", epochs)] + [Stage(f"round{t}", round_epochs, {"lr": lr})
                                            for t in range(1, len(self.snapshots) + 1)]

    def on_stage_start(self, stage: Stage, context: TrainContext) -> None:
        """Entering round ``t``: snapshot the network as rounds ``rounds_done..t-1`` (none on a resume inside it)."""
        target = min(int(context.stage_index), len(self.snapshots))
        for k in range(self.rounds_done, target):
            self.snapshots[k].load_state_dict(self.net.state_dict())
        self.rounds_done = max(self.rounds_done, target)

    # -- training -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def erase(self, images: torch.Tensor, labels: torch.Tensor, rounds: int | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The films with the regions mined by the first ``rounds`` snapshots erased (default: all taken).

        Args:
            images: ``(B, 1, S, S)`` original films; labels: ``(B, K)`` 0/1.

        Returns:
            ``(erased (B, 1, S, S), mined (B, 1, S, S) bool, teacher_logits (B, K) or None)``: erased pixels
            hold the film's mean; ``teacher_logits`` are snapshot 0's outputs on the original films.
        """
        rounds = self.rounds_done if rounds is None else int(rounds)
        fill = images.mean(dim=(1, 2, 3), keepdim=True)
        positive = labels[:, :, None, None] > 0.5
        mined = torch.zeros_like(images, dtype=torch.bool)
        current, teacher = images, None
        for k in range(rounds):
            logits, activations = self.snapshots[k](current)
            if k == 0:
                teacher = logits.float()
            cams = self.snapshots[k].normalized_cams(activations)
            strongest = torch.where(positive, cams, torch.full_like(cams, -1.0)).amax(dim=1, keepdim=True)
            strongest = F.interpolate(strongest, size=images.shape[-2:], mode="bilinear", align_corners=False)
            mined |= strongest > self.erase_threshold
            current = torch.where(mined, fill.to(images.dtype), images)
        return current, mined, teacher

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        images, labels = batch["image"], batch["labels"].float()
        if self.rounds_done == 0:
            logits, _ = self.net(images)
            bce = weighted_bce(logits, labels)
            return total_of({"bce": bce, "kp": bce.new_zeros(())})
        erased, _, teacher_logits = self.erase(images, labels)
        logits, _ = self.net(torch.cat([erased, images]))
        erased_logits, original_logits = logits.float().split(images.shape[0])
        kp = (torch.sigmoid(original_logits) - torch.sigmoid(teacher_logits)).pow(2).sum(dim=1).mean()
        return total_of({"bce": weighted_bce(erased_logits, labels), "kp": self.kp_weight * kp})

    # -- test time -----------------------------------------------------------------------------------------
    def round_networks(self) -> list[MSANet]:
        """The networks fused at test: the snapshots taken (rounds 0..t-1) and the current one."""
        return [*list(self.snapshots)[: self.rounds_done], self.net]

    def localize(self, images: torch.Tensor) -> Localization:
        maps, probabilities = [], []
        for net in self.round_networks():
            logits, activations = net(images)
            if self.predict_upsample > 1:
                activations = F.interpolate(activations.float(), scale_factor=self.predict_upsample, mode="bilinear",
                                            align_corners=False)
            maps.append(net.normalized_cams(activations))
            probabilities.append(torch.sigmoid(logits.float()))
        return Localization(torch.stack(maps).amax(dim=0), torch.stack(probabilities).mean(dim=0), self.threshold)

    def loss_weights(self) -> dict[str, str]:
        return {"kp": "iam.kp_weight"}

    def extra_state(self) -> dict:
        return {"rounds_done": self.rounds_done}

    def load_extra_state(self, state: dict) -> None:
        self.rounds_done = int(state.get("rounds_done", 0))
