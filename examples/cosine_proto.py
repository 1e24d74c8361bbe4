"""A complete network of the contract in docs/extending.md: a small trainable encoder, the
supports' masked-average prototype, and each query pixel's cosine similarity to it."""
import torch
import torch.nn as nn
import torch.nn.functional as F


class CosinePrototypeNet(nn.Module):
    def __init__(self, width: int = 32, ignore_label: int = 255):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(3, width, 3, stride=2, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, stride=2, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        self.scale = nn.Parameter(torch.tensor(10.0))   # cosine similarity in [-1, 1] -> logits
        self.ignore_label = ignore_label

    def forward(self, query_img, support_imgs, support_masks, query_mask=None, class_ids=None,
                return_extras=False):
        B, K = support_imgs.shape[:2]
        features = self.encoder(torch.cat([query_img, support_imgs.flatten(0, 1)]))
        query, support = features[:B], features[B:]
        target = (support_masks.flatten(0, 1) == 1).unsqueeze(1).float()
        target = F.interpolate(target, support.shape[-2:], mode="bilinear", align_corners=True)
        prototype = (support * target).sum((2, 3)) / (target.sum((2, 3)) + 1e-5)      # BK×C
        prototype = prototype.view(B, K, -1).mean(1)[:, :, None, None]                 # B×C×1×1
        similarity = F.cosine_similarity(query, prototype, dim=1).unsqueeze(1)        # B×1×h×w
        logits = torch.cat([-similarity, similarity], 1) * self.scale
        logits = F.interpolate(logits, query_img.shape[-2:], mode="bilinear", align_corners=True)
        if self.training:
            main = F.cross_entropy(logits, query_mask.long(), ignore_index=self.ignore_label)
            return logits, {"main": main, "total": main}
        if return_extras:
            prior = F.interpolate((similarity + 1) / 2, query_img.shape[-2:], mode="bilinear", align_corners=True)
            return logits, {"prior": prior}
        return logits


def build(cfg):
    """The builder ``arch examples.cosine_proto:build`` names: the validated config in, a network out."""
    return CosinePrototypeNet(width=cfg.reduce_dim, ignore_label=cfg.ignore_label)
