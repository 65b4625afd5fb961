"""ZegCLIP (Zhou et al., CVPR 2023, arXiv 2212.03588): one-stage adaptation of a frozen CLIP.

Deep prompt tuning adapts the frozen vision tower (M learnable tokens per layer through one shared
linear map); a relationship descriptor turns each class's text embedding t_c into a query
q_c = W_q [g ⊙ t_c ; t_c] with the image's global embedding g; a 3-layer decoder cross-attends the
queries to the patch embeddings, and the mask logit of class c at patch i is the head-averaged
pre-softmax attention score of its last layer. Trained with the non-mutually-exclusive loss
(sigmoid focal ×100 + dice ×1) over the seen classes only.

The parts Cascade-CLIP and CLIP-RC reuse live once in `zegkit.methods.zegclip_base`.

Where the paper is silent zegkit follows the released code (ZiqinZhou66/ZegCLIP @ 9ba4bb5, see
shared/research/zegclip.md): pixels normalised with ImageNet's mean/std, pixels labelled 255 are
negatives for every class in both loss terms (`ignore="negative"`; "ignore" is a true ignore mask),
and inductive models subtract 0.1 from the sigmoid score of every seen class at inference
(`seen_penalty`). Two released-code quirks are not reproduced, because they exist only for
compatibility with its own checkpoints, which zegkit does not load: the [CLS] input
2·class_embedding + pos_0 (we run CLIP's forward) and bilinear rather than bicubic resizing of the
position embeddings. The decoder's unused weights (every layer's self-attention, the last
layer's value path and feed-forward block) are not created.
"""

from __future__ import annotations

from torch import Tensor, nn

from zegkit.backbone import ClipBackbone
from zegkit.methods.zegclip_base import PromptedDecoderMethod, RelationshipDescriptor, ZegCLIPConfig

__all__ = ["ZegCLIP", "ZegCLIPConfig"]


class ZegCLIP(PromptedDecoderMethod):
    """ZegCLIP: deep prompts, relationship descriptor and ATM decoder on a frozen CLIP."""

    description = ("ZegCLIP (trained): deep prompt tuning + relationship-descriptor queries + "
                   "3-layer attention-to-mask decoder; needs --checkpoint from `zegkit train`")

    def build_head(self, backbone: ClipBackbone, dim: int) -> None:
        self.descriptor = RelationshipDescriptor(backbone.embed_dim, dim)
        self.memory_proj = (
            nn.Identity() if dim == backbone.embed_dim else nn.Linear(backbone.embed_dim, dim)
        )
        self.decoder = self.make_decoder(dim)

    def decode(self, backbone: ClipBackbone, pixels: Tensor,
               text_rows: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        out = backbone.forward_intermediates(pixels, indices=[], inject=self.injection())
        patches, global_embedding = self.joint_outputs(backbone, out)
        logits = self.decoder(self.descriptor(global_embedding, text_rows),
                              self.memory_proj(patches))
        return logits.view(*logits.shape[:2], *out.grid), {}
