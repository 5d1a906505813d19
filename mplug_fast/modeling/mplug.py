"""The mPLUG model and its task variants.

    images [B, 3, R, R] --vision--> [B, Nv, W] --adapter--> v [B, Nv, D]        encode_image
    ids [B, Lt] --text_encoder--> t [B, Lt, D]                                   encode_text
    (v, t) --skip-connected fusion--> (v', t')                                   fuse
    decoder(ids, mask, memory, memory_mask) -> logits [N, L, V]                  decode

Each task model owns only the components its task runs (docs/fidelity.md §1.7 minus the dead
weights): captioning's decoder reads the raw image tokens, VQA / grounding decoders read the fused
[image; text]. Momentum (EMA) copies exist only where the task trains with them (pretraining and
retrieval ITC); the official VQA momentum branch changes nothing in its loss and is not built here
(`mplug_fast.objectives.VQAObjective` owns EMA copies when its distillation is on). `MomentumView` puts
the momentum copies behind the same encode / fuse / decode API.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mplug_fast.config import MPlugConfig
from mplug_fast.modeling.decoder import MemoryKV, TextDecoder
from mplug_fast.modeling.fusion import SkipConnectedFusion, joint_mask
from mplug_fast.modeling.heads import LMHead
from mplug_fast.modeling.layers import init_bert_weights
from mplug_fast.modeling.masks import as_bool_mask
from mplug_fast.modeling.momentum import MomentumCopies
from mplug_fast.modeling.text import TextEncoder
from mplug_fast.modeling.vision import VisionTransformer, build_adapter

COMPONENTS = ("text_encoder", "fusion", "decoder", "retrieval_heads", "mlm_head")
INIT_TEMPERATURE = 0.07


class MPlug(nn.Module):
    """The full model: every component (what pretraining uses). Task variants below restrict it.

    Attributes (None when the task does not build them): vision, adapter (Identity for base),
    text_encoder, fusion, decoder, vision_proj / text_proj / itm_head / temp (retrieval heads),
    mlm_head (tied to the text encoder's word embeddings), momentum (ModuleDict of EMA copies).
    """

    components: ClassVar[tuple[str, ...]] = COMPONENTS
    momentum_components: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: MPlugConfig, *, task: str | None = None):
        """config: the model shape; task: the name this model is saved and reported under (the task layer
        sets it; default: the class name)."""
        super().__init__()
        self.config = config
        self.task = task or type(self).__name__
        D, V = config.text.hidden_size, config.text.vocab_size
        has = set(self.components)
        self.vision = VisionTransformer(config.vision, config.attention_backend)
        self.adapter = build_adapter(config)
        self.text_encoder = TextEncoder(config) if "text_encoder" in has else None
        self.fusion = SkipConnectedFusion(config) if "fusion" in has else None
        self.decoder = TextDecoder(config) if "decoder" in has else None
        heads = "retrieval_heads" in has
        self.vision_proj = nn.Linear(D, config.embed_dim) if heads else None
        self.text_proj = nn.Linear(D, config.embed_dim) if heads else None
        self.itm_head = nn.Linear(D, 2) if heads else None
        self.temp = nn.Parameter(torch.tensor(INIT_TEMPERATURE)) if heads else None
        self.mlm_head = LMHead(D, V, config.text.layer_norm_eps) if "mlm_head" in has else None
        self.momentum = MomentumCopies(self, self.momentum_components) if self.momentum_components else None

    # ----------------------------------------------------------------------------------- init
    @torch.no_grad()
    def init_weights(self) -> None:
        """Fresh weights, the only initialiser: vision by `VisionTransformer.init_weights` (CLIP-like); BERT
        parts, adapter and heads N(0, 0.02) weights, zero biases, LayerNorm (1, 0); temp 0.07; momentum
        copies = the online weights. Real runs start from OpenAI CLIP + bert-base-uncased
        (`mplug_fast.checkpoint.init`) or an official checkpoint (`mplug_fast.load_official_checkpoint`).
        """
        for name, child in self.named_children():
            if name == "momentum":
                continue
            if name == "vision":
                child.init_weights()
            else:
                child.apply(init_bert_weights)
        for head in (self.mlm_head, self.decoder.head if self.decoder is not None else None):
            if head is not None:
                head.bias.zero_()
        if self.temp is not None:
            self.temp.fill_(INIT_TEMPERATURE)
        self.copy_to_momentum()

    @torch.no_grad()
    def copy_to_momentum(self) -> None:
        """Set every momentum copy to the online weights."""
        if self.momentum is not None:
            self.momentum.reset(self)

    # ----------------------------------------------------------------------------------- public API
    def encode_image(self, images: Tensor) -> Tensor:
        """images: [B, 3, R, R] CLIP-normalised -> image states [B, Nv, D] (after the adapter)."""
        return self.adapter(self.vision(images))

    def encode_text(self, ids: Tensor, mask: Tensor | None = None) -> Tensor:
        """ids: long [B, L]; mask: [B, L] 1 = token -> text states [B, L, D]."""
        return self._require("text_encoder")(ids, mask)

    def fuse(
        self,
        image_states: Tensor,
        text_states: Tensor,
        text_mask: Tensor | None = None,
        image_mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Skip-connected fusion. image_states [B, Nv, D], text_states [B, Lt, D], text_mask [B, Lt]
        (1 = token), image_mask [B, Nv] (None = all). Returns (image [B, Nv, D], text [B, Lt, D])."""
        text_mask = as_bool_mask(text_mask, text_states.shape[:2])
        image_mask = as_bool_mask(image_mask, image_states.shape[:2])
        return self._require("fusion")(image_states, text_states, text_mask, image_mask)

    def decode(
        self,
        ids: Tensor,
        mask: Tensor | None,
        memory: Tensor | None,
        memory_mask: Tensor | None = None,
        *,
        memory_kv: MemoryKV | None = None,
        memory_index: Tensor | None = None,
    ) -> Tensor:
        """Decoder logits [N, L, V] for ids [N, L] over memory [Bm, M, D] (see `TextDecoder.forward`)."""
        return self._require("decoder")(
            ids, mask, memory, memory_mask, memory_kv=memory_kv, memory_index=memory_index
        )

    def fused_memory(self, images: Tensor, ids: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """The VQA / grounding / PrefixLM decoder memory: ([v'; t'] [B, Nv+Lt, D], mask bool [B, Nv+Lt])."""
        return self.fused_memory_from_states(self.encode_image(images), ids, mask)

    def fused_memory_from_states(
        self, image_states: Tensor, ids: Tensor, mask: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """`fused_memory` from already encoded visual tokens [B, Nv, D] (e.g. the concatenated frames of a
        video, [B, T*Nv, D]): ([v'; t'] [B, Nv+Lt, D], mask bool [B, Nv+Lt])."""
        t = self.encode_text(ids, mask)
        v, t = self.fuse(image_states, t, mask)
        t_mask = as_bool_mask(mask, ids.shape)
        if t_mask is None:  # the memory always has a mask: [image; text], every token real
            t_mask = torch.ones(ids.shape, dtype=torch.bool, device=ids.device)
        memory_mask = joint_mask(v, t, None, t_mask)  # bool [B, Nv + Lt]
        return torch.cat([v, t], dim=1), memory_mask  # copy: [B, Nv + Lt, D]

    def image_features(self, image_states: Tensor) -> Tensor:
        """ITC image feature: normalize(vision_proj(class token)) [B, embed_dim]."""
        return F.normalize(self._require("vision_proj")(image_states[:, 0]), dim=-1)

    def text_features(self, text_states: Tensor) -> Tensor:
        """ITC text feature: normalize(text_proj([CLS] of the unimodal text encoder)) [B, embed_dim]."""
        return F.normalize(self._require("text_proj")(text_states[:, 0]), dim=-1)

    def itm_logits(self, image_states: Tensor, text_states: Tensor, text_mask: Tensor | None) -> Tensor:
        """Image-text matching logits [B, 2] from the fused text token 0 (class 1 = match)."""
        _, t = self.fuse(image_states, text_states, text_mask)
        return self._require("itm_head")(t[:, 0])

    def mlm_logits(self, fused_text_states: Tensor) -> Tensor:
        """Masked-LM logits [B, L, V] over the fused text states (head tied to the text word embeddings)."""
        word = self._require("text_encoder").embeddings.word.weight
        return self._require("mlm_head")(fused_text_states, word)

    def momentum_view(self) -> MomentumView:
        """The momentum copies behind the same encode / fuse / decode API (see `MomentumView`)."""
        if self.momentum is None:
            raise AttributeError(f"the {self.task!r} model has no momentum copies")
        return MomentumView(self.momentum)

    def _require(self, name: str) -> nn.Module:
        module = getattr(self, name)
        if module is None:
            owned = [n for n, _ in self.named_children()] + (["temp"] if self.temp is not None else [])
            raise AttributeError(
                f"the {self.task!r} model has no {name!r} (it owns: {', '.join(owned)}); "
                "build the task model that needs it (mplug_fast.build_model(config, task))"
            )
        return module


class MomentumView:
    """The momentum (EMA) copies behind the public API of `MPlug` (`encode_image`, `encode_text`, `fuse`,
    `fused_memory` (+ `_from_states`), `decode`, `image_features`, `text_features`, `mlm_logits`).

    `modules` maps component names to their EMA copies (a model's `momentum` ModuleDict, or copies an
    objective owns); a component without a copy raises a clear error when used. Call under `torch.no_grad()`.
    """

    task = "momentum"
    encode_image = MPlug.encode_image
    encode_text = MPlug.encode_text
    fuse = MPlug.fuse
    fused_memory = MPlug.fused_memory
    fused_memory_from_states = MPlug.fused_memory_from_states
    decode = MPlug.decode
    image_features = MPlug.image_features
    text_features = MPlug.text_features
    mlm_logits = MPlug.mlm_logits

    def __init__(self, modules: nn.ModuleDict | dict[str, nn.Module]):
        self.modules = modules
        self.adapter = modules["adapter"] if "adapter" in modules else nn.Identity()

    def __getattr__(self, name: str) -> nn.Module:
        """A component's momentum copy; AttributeError (naming the copies there are) for any other name."""
        modules = self.__dict__.get("modules", {})
        if name in modules:
            return modules[name]
        raise AttributeError(
            f"there is no momentum copy of {name!r} (copies: {', '.join(modules)}); "
            "add it to the model's momentum_components"
        )

    def _require(self, name: str) -> nn.Module:
        return getattr(self, name)


class MPlugForPretraining(MPlug):
    """ITC + ITM + MLM + PrefixLM: every component, with momentum copies for distillation.

    No `forward`: the objectives (`mplug_fast.objectives`) compose the public methods
    (`encode_image`, `encode_text`, `fuse`, `fused_memory`, `decode`, `mlm_logits`, `itm_logits`).
    """

    components = COMPONENTS
    momentum_components = (
        "vision",
        "adapter",
        "text_encoder",
        "fusion",
        "decoder",
        "vision_proj",
        "text_proj",
    )


class MPlugForVQA(MPlug):
    """Question -> fusion -> decoder over [image; question] generates or ranks the answer."""

    components = ("text_encoder", "fusion", "decoder")

    def forward(
        self,
        images: Tensor,
        question_ids: Tensor,
        question_mask: Tensor | None,
        answer_ids: Tensor,
        answer_mask: Tensor | None,
        answer_index: Tensor | None = None,
    ) -> Tensor:
        """images [B, 3, R, R]; question_ids/mask [B, Lq]; answer_ids/mask [N, La] ([CLS] answer [SEP] [SEP]);
        answer_index long [N]: question of each answer (None when N == B). Returns logits [N, La, V]."""
        memory, memory_mask = self.fused_memory(images, question_ids, question_mask)
        return self.decode(answer_ids, answer_mask, memory, memory_mask, memory_index=answer_index)


class MPlugForCaption(MPlug):
    """Decoder over the raw image tokens (the official caption model's text encoder and fusion are dead)."""

    components = ("decoder",)

    def forward(self, images: Tensor, caption_ids: Tensor, caption_mask: Tensor | None) -> Tensor:
        """images [B, 3, R, R]; caption_ids/mask [B, L] -> logits [B, L, V]."""
        return self.decode(caption_ids, caption_mask, self.encode_image(images))


class MPlugForRetrieval(MPlug):
    """ITC (projections + temperature, momentum encoders) and ITM (fusion + itm_head)."""

    components = ("text_encoder", "fusion", "retrieval_heads")
    momentum_components = ("vision", "adapter", "text_encoder", "vision_proj", "text_proj")

    def forward(self, images: Tensor, text_ids: Tensor, text_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """Paired images [B, 3, R, R] and texts [B, L].

        Returns (ITC similarity / temp [B, B], ITM logits of the pairs [B, 2])."""
        v = self.encode_image(images)
        t = self.encode_text(text_ids, text_mask)
        sim = self.image_features(v) @ self.text_features(t).t() / self.temp
        return sim, self.itm_logits(v, t, text_mask)


class MPlugForGrounding(MPlug):
    """Referring expression -> fusion -> decoder emits [unused339] + 4 coordinate tokens."""

    components = ("text_encoder", "fusion", "decoder")

    def forward(self, images: Tensor, text_ids: Tensor, text_mask: Tensor | None, box_ids: Tensor) -> Tensor:
        """images [B, 3, R, R]; text_ids/mask [B, L]; box_ids long [B, 5] (prefix + cx, cy, w, h tokens).
        Returns logits [B, 5, V]."""
        memory, memory_mask = self.fused_memory(images, text_ids, text_mask)
        return self.decode(box_ids, None, memory, memory_mask)
