"""Metrics, each from a maintained library where one computes it (torchmetrics; transformers for the CLIP and
DINO models), with models loaded from local files the user names -- nothing is downloaded at run time.

Definitions, and where they depart from the papers' code, are in docs/evaluation.md. In short (``crop`` = the
generated image cut to the mask's bounding box, ``unmasked`` = pixels outside the mask):

* ``clip_score``  -- ProFI-Painter's local CLIP score: torchmetrics' CLIPScore, 100 * max(cos(crop, prompt), 0).
* ``clip_accuracy`` -- the crop classified by CLIP among the dataset's class names ("a photo of a <name>"); right
  when the top class is the case's. (The paper runs an MMDetection COCO detector on the crop instead.)
* ``aesthetic``   -- LAION's improved aesthetic predictor: its MLP on the L2-normalised CLIP ViT-L/14 image
  embedding of the whole image.
* ``psnr_unmasked`` / ``mse_unmasked`` / ``ssim_unmasked`` / ``lpips_unmasked`` -- BrushNet's preservation metrics
  against the input image: PSNR and MSE over the unmasked pixels (torchmetrics, data range 1; identical pixels give
  PSNR = inf, kept as inf and left out of means), SSIM and LPIPS on both images with the masked region zeroed.
* ``clip_similarity`` -- BrushNet's CLIP similarity: CLIPScore of the whole image and the prompt.
* ``clip_i`` / ``dino`` -- LAR-Gen's subject fidelity: 100 * cosine of the CLIP embeddings (``dino``: cosine of the
  DINO CLS tokens) of the subject image and the crop; ``clip_t`` -- 100 * cosine of the crop's and the prompt's CLIP
  embeddings (LAR-Gen's CLIP-T; its tables print both x 100).
* ``pickscore`` -- PickScore v1: logit_scale.exp() * cos(CLIP(whole image), CLIP(prompt)) with the PickScore CLIP.
* ``image_reward`` -- ImageReward v1.0: BLIP ViT-L image tokens, cross-attended by its BERT text encoder, the [CLS]
  feature through its linear head, normalised by the published mean and std.
* ``hps_v2`` -- HPS v2 / v2.1: cos(image, prompt) of the OpenCLIP ViT-H-14 fine-tune (the checkpoint decides which).
* ``toy`` -- the toy world's blob scorer (kernels.toy_world.score_case) on the exact result cells.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from faithful_inpaint.evaluation.engine import Metric, MetricInput


class MetricError(ValueError):
    """A metric is unknown, or its model file is missing or of the wrong kind; the message names the file."""


@dataclass
class MetricFiles:
    clip: str | None = None             # a transformers CLIP folder (config.json, weights, tokenizer, processor)
    aesthetic_clip: str | None = None   # CLIP ViT-L/14 folder for the aesthetic MLP (default: ``clip``)
    aesthetic: str | None = None        # the LAION aesthetic MLP state dict (.safetensors / .pth)
    dino: str | None = None             # a transformers DINO / DINOv2 folder
    lpips_backbone: str | None = None   # torchvision weights of the LPIPS backbone (AlexNet / SqueezeNet / VGG16)
    lpips_net: str = "squeeze"          # BrushNet's choice
    pickscore: str | None = None        # the PickScore_v1 folder (a transformers CLIPModel)
    pickscore_processor: str | None = None   # its processor's folder when not in ``pickscore`` (the reference
                                              # takes it from laion/CLIP-ViT-H-14-laion2B-s32B-b79K)
    image_reward: str | None = None     # ImageReward.pt (THUDM/ImageReward v1.0)
    image_reward_tokenizer: str | None = None   # bert-base-uncased tokenizer folder (default: ImageReward.pt's folder)
    hps: str | None = None              # HPS_v2_compressed.pt / HPS_v2.1_compressed.pt
    hps_architecture: str = "ViT-H-14"  # the open_clip model name (or a model config .json) the HPS file fine-tunes


def bounding_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.nonzero(mask)
    return int(rows.min()), int(cols.min()), int(rows.max()) + 1, int(cols.max()) + 1


def crop(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    y0, x0, y1, x1 = bounding_box(mask)
    return image[y0:y1, x0:x1]


def to_chw(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()


def to_uint8_chw(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy((np.clip(image, 0, 1) * 255).round().astype(np.uint8)).permute(2, 0, 1)


# ------------------------------------------------------------------------------------------------ loading models

def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors or .pt/.pth file (the latter with ``weights_only``: no code from the file runs)."""
    path = Path(path)
    if not path.is_file():
        raise MetricError(f"model file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 -- any failure to parse is reported with the file's name
        raise MetricError(f"{path}: not a readable weights file ({type(error).__name__}: {error})") from None
    if isinstance(data, dict) and "state_dict" in data and isinstance(data["state_dict"], dict):
        data = data["state_dict"]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise MetricError(f"{path}: not a state dict of tensors")
    return data


_cache: dict = {}


def load_clip(folder: str | None, what: str = "clip", processor_folder: str | None = None):
    """(CLIPModel, CLIPProcessor) from a local transformers folder (the processor from ``processor_folder`` if
    given; no download)."""
    if not folder:
        raise MetricError(f"this metric needs a CLIP model folder: --{what.replace('_', '-')} DIR")
    key = ("clip", str(folder), str(processor_folder))
    if key not in _cache:
        from transformers import CLIPConfig, CLIPModel, CLIPProcessor

        path = Path(folder)
        if not (path / "config.json").is_file():
            raise MetricError(f"{path}: not a transformers model folder (no config.json)")
        try:
            config = CLIPConfig.from_pretrained(path, local_files_only=True)
            if config.model_type != "clip":
                raise ValueError(f"model_type is {config.model_type!r}, not 'clip'")
            model = CLIPModel.from_pretrained(path, local_files_only=True).eval()
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise MetricError(f"{path}: not a CLIP model folder ({type(error).__name__}: {error})") from None
        source = Path(processor_folder or path)
        try:
            processor = CLIPProcessor.from_pretrained(source, local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise MetricError(f"{source}: no CLIP processor (tokenizer + image processor) there "
                              f"({type(error).__name__}: {error})") from None
        _cache[key] = (model, processor)
    return _cache[key]


def _features(out) -> torch.Tensor:
    """transformers returns a tensor or (in newer versions) an output object from get_*_features."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@torch.no_grad()
def clip_image_embeddings(model, processor, images: list[np.ndarray]) -> torch.Tensor:
    pixels = processor(images=[to_uint8_chw(i) for i in images], return_tensors="pt")["pixel_values"]
    e = _features(model.get_image_features(pixel_values=pixels))
    return e / e.norm(dim=-1, keepdim=True)


@torch.no_grad()
def clip_text_embeddings(model, processor, texts: list[str]) -> torch.Tensor:
    tokens = processor(text=texts, return_tensors="pt", padding=True, truncation=True)
    e = _features(model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]))
    return e / e.norm(dim=-1, keepdim=True)


# ------------------------------------------------------------------------------------------------------- metrics

class FeatureTensors(torch.nn.Module):
    """A CLIPModel whose get_image_features / get_text_features return the embedding tensor, as torchmetrics'
    CLIPScore expects (transformers 5 returns an output object holding it)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    def get_image_features(self, *args, **kwargs):
        return _features(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs):
        return _features(self.model.get_text_features(*args, **kwargs))


class ClipScore(Metric):
    """ProFI-Painter's local CLIP score (crop = True) or BrushNet's CLIP similarity (whole image)."""
    fields = ()

    def __init__(self, files: MetricFiles, name="clip_score", local=True):
        self.name, self.fields, self.local = name, (name,), local
        model, processor = load_clip(files.clip)
        self.model = (FeatureTensors(model), processor)

    @torch.no_grad()
    def compute(self, inp: MetricInput) -> dict:
        from torchmetrics.functional.multimodal import clip_score

        image = crop(inp.output, inp.mask) if self.local else inp.output
        value = clip_score(to_uint8_chw(image), inp.case.prompt, model_name_or_path=lambda: self.model)
        return {self.name: float(value)}


class ClipAccuracy(Metric):
    name, fields = "clip_accuracy", ("clip_accuracy", "clip_class")

    def __init__(self, files: MetricFiles, class_names: list[str] | None):
        if not class_names:
            raise MetricError("clip_accuracy needs class names: a dataset with classes (COCO, or class_name in the "
                              "JSONL cases)")
        self.model, self.processor = load_clip(files.clip)
        self.class_names = list(class_names)
        self.text = clip_text_embeddings(self.model, self.processor, [f"a photo of a {n}" for n in class_names])

    def compute(self, inp: MetricInput) -> dict:
        image = clip_image_embeddings(self.model, self.processor, [crop(inp.output, inp.mask)])
        top = self.class_names[int((image @ self.text.T).argmax())]
        return {"clip_accuracy": top == inp.case.class_name, "clip_class": top}


class AestheticMLP(torch.nn.Module):
    """LAION's improved aesthetic predictor head (768 -> 1024 -> 128 -> 64 -> 16 -> 1; dropout inactive)."""

    def __init__(self, dim: int = 768):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(dim, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128), torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 64), torch.nn.Dropout(0.1), torch.nn.Linear(64, 16), torch.nn.Linear(16, 1))

    def forward(self, x):
        return self.layers(x)


class Aesthetic(Metric):
    name, fields = "aesthetic", ("aesthetic",)

    def __init__(self, files: MetricFiles):
        if not files.aesthetic:
            raise MetricError("aesthetic needs the LAION aesthetic MLP file: --aesthetic FILE")
        self.clip = load_clip(files.aesthetic_clip or files.clip, "aesthetic_clip")
        state = load_state_dict(files.aesthetic)
        first = state.get("layers.0.weight")
        if first is None or first.ndim != 2:
            raise MetricError(f"{files.aesthetic}: not a LAION aesthetic MLP (no layers.0.weight; keys: "
                              f"{sorted(state)[:4]} ...)")
        self.mlp = AestheticMLP(first.shape[1])
        try:
            self.mlp.load_state_dict(state)
        except RuntimeError as error:
            raise MetricError(f"{files.aesthetic}: not a LAION aesthetic MLP ({str(error).splitlines()[0]})") from None
        width = self.clip[0].config.projection_dim
        if width != first.shape[1]:
            raise MetricError(f"{files.aesthetic}: the MLP takes {first.shape[1]}-d embeddings but the CLIP model "
                              f"gives {width}-d (it expects CLIP ViT-L/14)")
        self.mlp.eval()

    @torch.no_grad()
    def compute(self, inp: MetricInput) -> dict:
        e = clip_image_embeddings(*self.clip, [inp.output])
        return {"aesthetic": float(self.mlp(e)[0, 0])}


def unmasked_pixels(inp: MetricInput) -> tuple[torch.Tensor, torch.Tensor]:
    keep = torch.from_numpy(~inp.mask)
    return torch.from_numpy(inp.output)[keep], torch.from_numpy(inp.image)[keep]    # [N, 3] each


class PSNRUnmasked(Metric):
    name, fields = "psnr_unmasked", ("psnr_unmasked",)

    def compute(self, inp: MetricInput) -> dict:
        from torchmetrics.functional.image import peak_signal_noise_ratio

        pred, target = unmasked_pixels(inp)
        return {self.name: float(peak_signal_noise_ratio(pred, target, data_range=1.0))}


class MSEUnmasked(Metric):
    name, fields = "mse_unmasked", ("mse_unmasked",)

    def compute(self, inp: MetricInput) -> dict:
        from torchmetrics.functional import mean_squared_error

        pred, target = unmasked_pixels(inp)
        return {self.name: float(mean_squared_error(pred, target))}


def masked_out(image: np.ndarray, mask: np.ndarray) -> torch.Tensor:
    """[1, 3, H, W] with the masked pixels zeroed (BrushNet's way of restricting a full-image metric)."""
    return to_chw(np.where(mask[..., None], 0.0, image).astype(np.float32))[None]


class SSIMUnmasked(Metric):
    name, fields = "ssim_unmasked", ("ssim_unmasked",)

    def compute(self, inp: MetricInput) -> dict:
        from torchmetrics.functional.image import structural_similarity_index_measure

        value = structural_similarity_index_measure(masked_out(inp.output, inp.mask),
                                                    masked_out(inp.image, inp.mask), data_range=1.0)
        return {self.name: float(value)}


def lpips_model(net: str, backbone: str | None, random_backbone: bool = False):
    """torchmetrics' LPIPS network with its shipped linear heads and the backbone from the user's torchvision
    weights file (``random_backbone``: left random, for tests: identical images still give 0)."""
    from torchmetrics.functional.image.lpips import _LPIPS

    if backbone is None and not random_backbone:
        raise MetricError(f"lpips_unmasked needs the torchvision {net} weights file: --lpips-backbone FILE "
                          "(e.g. squeezenet1_1-b8a52dc0.pth from torchvision)")
    model = _LPIPS(pretrained=True, net=net, pnet_rand=True)
    if backbone is not None:
        state = load_state_dict(backbone)
        renamed = {}
        for key in model.net.state_dict():   # "slice1.0.weight" / "slices.0.0.weight" <- "features.0.weight"
            parts = key.split(".")
            feature = parts[2:] if parts[0] == "slices" else parts[1:]
            source = "features." + ".".join(feature)
            if source in state:
                renamed[key] = state[source]
        expected = set(model.net.state_dict())
        if set(renamed) != expected:
            raise MetricError(f"{backbone}: not torchvision {net} weights ({len(expected - set(renamed))} of "
                              f"{len(expected)} backbone tensors missing)")
        try:
            model.net.load_state_dict(renamed)
        except RuntimeError as error:
            raise MetricError(f"{backbone}: not torchvision {net} weights ({str(error).splitlines()[0]})") from None
    return model.eval()


class LPIPSUnmasked(Metric):
    name, fields = "lpips_unmasked", ("lpips_unmasked",)

    def __init__(self, files: MetricFiles, random_backbone: bool = False):
        self.model = lpips_model(files.lpips_net, files.lpips_backbone, random_backbone)

    @torch.no_grad()
    def compute(self, inp: MetricInput) -> dict:
        a, b = masked_out(inp.output, inp.mask), masked_out(inp.image, inp.mask)
        return {self.name: float(self.model(a * 2 - 1, b * 2 - 1).mean())}


class ClipSubject(Metric):
    """LAR-Gen's CLIP-I (subject vs crop) and CLIP-T (crop vs prompt): 100 * cosine, as its tables print them."""
    name, fields = "clip_i", ("clip_i", "clip_t")

    def __init__(self, files: MetricFiles):
        self.model, self.processor = load_clip(files.clip)

    def compute(self, inp: MetricInput) -> dict:
        region = crop(inp.output, inp.mask)
        if inp.case.load_subject is None:
            raise MetricError(f"case {inp.case.id}: clip_i needs a subject image (a quadruple dataset)")
        img = clip_image_embeddings(self.model, self.processor, [inp.case.load_subject(), region])
        txt = clip_text_embeddings(self.model, self.processor, [inp.case.prompt])
        return {"clip_i": 100 * float(img[0] @ img[1]), "clip_t": 100 * float(img[1] @ txt[0])}


class Dino(Metric):
    name, fields = "dino", ("dino",)

    def __init__(self, files: MetricFiles):
        if not files.dino:
            raise MetricError("dino needs a DINO model folder: --dino DIR")
        from transformers import AutoImageProcessor, AutoModel

        path = Path(files.dino)
        try:
            self.model = AutoModel.from_pretrained(path, local_files_only=True).eval()
            self.processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError, KeyError) as error:
            raise MetricError(f"{path}: not a DINO model folder ({type(error).__name__}: {error})") from None
        if "dino" not in self.model.config.model_type:
            raise MetricError(f"{path}: model_type {self.model.config.model_type!r} is not a DINO model")

    @torch.no_grad()
    def compute(self, inp: MetricInput) -> dict:
        if inp.case.load_subject is None:
            raise MetricError(f"case {inp.case.id}: dino needs a subject image (a quadruple dataset)")
        pixels = self.processor(images=[to_uint8_chw(inp.case.load_subject()),
                                        to_uint8_chw(crop(inp.output, inp.mask))], return_tensors="pt")
        cls = self.model(pixel_values=pixels["pixel_values"]).last_hidden_state[:, 0]
        cls = cls / cls.norm(dim=-1, keepdim=True)
        return {"dino": float(cls[0] @ cls[1])}


# ------------------------------------------------------------------------------------------- preference metrics

class PickScore(Metric):
    """PickScore v1 (Kirstain et al.): its CLIP's logit_scale.exp() * cos(image, prompt), the whole image."""
    name, fields = "pickscore", ("pickscore",)

    def __init__(self, files: MetricFiles):
        if not files.pickscore:
            raise MetricError("pickscore needs the PickScore_v1 model folder: --pickscore DIR")
        self.model, self.processor = load_clip(files.pickscore, "pickscore", files.pickscore_processor)

    @torch.no_grad()
    def compute(self, inp: MetricInput) -> dict:
        image = clip_image_embeddings(self.model, self.processor, [inp.output])
        text = clip_text_embeddings(self.model, self.processor, [inp.case.prompt])
        return {self.name: float(self.model.logit_scale.exp() * (image[0] @ text[0]))}


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)       # OpenAI CLIP's normalisation (ImageReward and HPS use it)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_REWARD_MEAN, IMAGE_REWARD_STD = 0.16717362830052426, 1.0333394966054072   # ImageReward v1.0's published
IMAGE_REWARD_TOKENS = 35                               # prompt length the reference pads / truncates to
HEAD_WIDTH = 64                                        # per-head width of BLIP's ViT-L (16 x 64) and BERT (12 x 64)


def _count(state: dict, prefix: str) -> int:
    """Number of numbered blocks ``prefix<i>.`` in a state dict."""
    return len({k[len(prefix):].split(".")[0] for k in state if k.startswith(prefix)})


def _load_part(module: torch.nn.Module, state: dict, path, what: str) -> None:
    """Load exactly ``state`` into ``module`` (strict); a mismatch is a MetricError naming the file."""
    try:
        module.load_state_dict(state)
    except RuntimeError as error:
        lines = [line.strip() for line in str(error).splitlines()[1:] if line.strip()]
        detail = lines[0][:300] if lines else str(error)[:300]
        raise MetricError(f"{path}: not an {what} checkpoint ({detail})") from None


def _blip_vision_key(name: str) -> str:
    """A key of BLIP's timm-style ViT (ImageReward's ``blip.visual_encoder.``) as transformers' BlipVisionModel
    names it (an unknown key is kept, and the strict load reports it)."""
    if name.startswith("norm."):
        return "post_layernorm." + name[len("norm."):]
    for old, new in (("cls_token", "embeddings.class_embedding"), ("pos_embed", "embeddings.position_embedding"),
                     ("patch_embed.proj.", "embeddings.patch_embedding.")):
        if name.startswith(old):
            return new + name[len(old):]
    if name.startswith("blocks."):
        index, rest = name[len("blocks."):].split(".", 1)
        for old, new in (("norm1.", "layer_norm1."), ("norm2.", "layer_norm2."), ("attn.qkv.", "self_attn.qkv."),
                         ("attn.proj.", "self_attn.projection."), ("mlp.", "mlp.")):
            if rest.startswith(old):
                return f"encoder.layers.{index}.{new}{rest[len(old):]}"
    return name


def _image_reward_configs(state: dict, v: str, t: str):
    """BlipVisionConfig and BlipTextConfig of an ImageReward state dict, read off its tensors' shapes."""
    from transformers import BlipTextConfig, BlipVisionConfig

    width, _, patch, _ = state[v + "patch_embed.proj.weight"].shape
    grid = int(round((state[v + "pos_embed"].shape[1] - 1) ** 0.5))
    vision_config = BlipVisionConfig(
        hidden_size=width, intermediate_size=state[v + "blocks.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=_count(state, v + "blocks."), num_attention_heads=max(width // HEAD_WIDTH, 1),
        image_size=grid * patch, patch_size=patch, layer_norm_eps=1e-6, hidden_act="gelu", attention_dropout=0.0)
    vocab, hidden = state[t + "embeddings.word_embeddings.weight"].shape
    text_config = BlipTextConfig(
        vocab_size=vocab, hidden_size=hidden, encoder_hidden_size=width,
        intermediate_size=state[t + "encoder.layer.0.intermediate.dense.weight"].shape[0],
        num_hidden_layers=_count(state, t + "encoder.layer."), num_attention_heads=max(hidden // HEAD_WIDTH, 1),
        max_position_embeddings=state[t + "embeddings.position_embeddings.weight"].shape[0], layer_norm_eps=1e-12,
        hidden_act="gelu", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        bos_token_id=None, eos_token_id=None, sep_token_id=None,    # unused: the score only encodes
        is_decoder=True)    # builds the cross-attention; the forward runs with is_decoder=False (bidirectional)
    return vision_config, text_config


def image_reward_parts(path: str | Path):
    """ImageReward.pt's tensors as maintained modules: the BLIP ViT as transformers' BlipVisionModel, the
    cross-attending BERT as BlipTextModel (BLIP's med.py, which transformers ported), the head as the LAION-style MLP
    (five linear layers, no activations, as the reference). Sizes come from the tensors' shapes; heads are the width
    / 64, as in both reference encoders."""
    from transformers import BlipTextModel, BlipVisionModel

    state = load_state_dict(path)
    needed = ("blip.visual_encoder.patch_embed.proj.weight", "blip.visual_encoder.pos_embed",
              "blip.text_encoder.embeddings.word_embeddings.weight", "mlp.layers.0.weight")
    missing = [k for k in needed if k not in state]
    if missing:
        raise MetricError(f"{path}: not an ImageReward checkpoint (no {missing[0]}; keys: {sorted(state)[:4]} ...)")
    v, t = "blip.visual_encoder.", "blip.text_encoder."
    try:
        vision_config, text_config = _image_reward_configs(state, v, t)
    except (KeyError, ValueError) as error:
        raise MetricError(f"{path}: not an ImageReward checkpoint ({type(error).__name__}: {error})") from None
    hidden = text_config.hidden_size
    vision_state = {_blip_vision_key(k[len(v):]): val for k, val in state.items() if k.startswith(v)}
    text_state = {k[len(t):]: val for k, val in state.items()
                  if k.startswith(t) and not k.endswith("position_ids")}      # a buffer, not a weight
    mlp_state = {k[len("mlp."):]: val for k, val in state.items() if k.startswith("mlp.")}

    vision = BlipVisionModel(vision_config)
    text = BlipTextModel(text_config, add_pooling_layer=False)
    mlp = AestheticMLP(mlp_state["layers.0.weight"].shape[1])
    parts = ((vision, vision_state, "ImageReward (BLIP ViT)"), (text, text_state, "ImageReward (BLIP text encoder)"),
             (mlp, mlp_state, "ImageReward (head)"))
    for module, part, what in parts:
        _load_part(module, {k: x.float() for k, x in part.items()}, path, what)
    if mlp_state["layers.0.weight"].shape[1] != hidden:
        raise MetricError(f"{path}: the ImageReward head takes {mlp_state['layers.0.weight'].shape[1]}-d features but "
                          f"the text encoder gives {hidden}-d")
    return vision.eval(), text.eval(), mlp.eval()


def bert_tokenizer(folder: Path, vocab: int, checkpoint):
    """BLIP's tokenizer: bert-base-uncased plus its two added tokens ([DEC] as BOS, [ENC]), whose count must match
    the checkpoint's embedding rows."""
    from transformers import BertTokenizer

    if not (folder / "vocab.txt").is_file():
        raise MetricError(f"image_reward needs the bert-base-uncased tokenizer (vocab.txt): {folder} has none; name "
                          "its folder with --image-reward-tokenizer DIR")
    try:
        tokenizer = BertTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise MetricError(f"{folder}: not a BERT tokenizer folder ({type(error).__name__}: {error})") from None
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_tokens(["[ENC]"], special_tokens=True)
    if len(tokenizer) != vocab:
        raise MetricError(f"{folder}: a tokenizer of {len(tokenizer)} tokens (with BLIP's [DEC], [ENC]), but "
                          f"{checkpoint} embeds {vocab}: not the bert-base-uncased vocabulary of ImageReward")
    return tokenizer


class ImageReward(Metric):
    """ImageReward v1.0 (Xu et al.): reward of the whole image for the prompt, normalised as the reference does."""
    name, fields = "image_reward", ("image_reward",)

    def __init__(self, files: MetricFiles):
        if not files.image_reward:
            raise MetricError("image_reward needs the ImageReward v1.0 checkpoint: --image-reward FILE "
                              "(ImageReward.pt)")
        key = ("image_reward", files.image_reward, files.image_reward_tokenizer)
        if key not in _cache:
            vision, text, mlp = image_reward_parts(files.image_reward)
            folder = Path(files.image_reward_tokenizer or Path(files.image_reward).parent)
            tokenizer = bert_tokenizer(folder, text.config.vocab_size, files.image_reward)
            _cache[key] = (vision, text, mlp, tokenizer)
        self.vision, self.text, self.mlp, self.tokenizer = _cache[key]

    def pixels(self, image: np.ndarray) -> torch.Tensor:
        """The reference's preprocessing: bicubic resize of the short side, centre crop, CLIP normalisation."""
        from PIL import Image
        from torchvision import transforms

        size = self.vision.config.image_size
        pipeline = transforms.Compose([transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
                                       transforms.CenterCrop(size), transforms.ToTensor(),
                                       transforms.Normalize(CLIP_MEAN, CLIP_STD)])
        return pipeline(Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8)))[None]

    @torch.no_grad()
    def compute(self, inp: MetricInput) -> dict:
        tokens = self.tokenizer(inp.case.prompt, padding="max_length", truncation=True, max_length=IMAGE_REWARD_TOKENS,
                                return_tensors="pt")
        image = self.vision(pixel_values=self.pixels(inp.output)).last_hidden_state
        out = self.text(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                        encoder_hidden_states=image,
                        encoder_attention_mask=torch.ones(image.shape[:2], dtype=torch.long), is_decoder=False)
        reward = self.mlp(out.last_hidden_state[:, 0].float())
        return {self.name: float((reward[0, 0] - IMAGE_REWARD_MEAN) / IMAGE_REWARD_STD)}


class HPSv2(Metric):
    """Human Preference Score v2 / v2.1 (Wu et al.): cos(image, prompt) of the fine-tuned OpenCLIP model."""
    name, fields = "hps_v2", ("hps_v2",)

    def __init__(self, files: MetricFiles):
        if not files.hps:
            raise MetricError("hps_v2 needs the HPS v2 / v2.1 checkpoint: --hps FILE (HPS_v2.1_compressed.pt)")
        try:
            import open_clip
        except ImportError:
            raise MetricError("hps_v2 needs open_clip_torch (pip install open_clip_torch)") from None
        arch = files.hps_architecture
        if arch.endswith(".json"):                           # a model config of open_clip's format
            if not Path(arch).is_file():
                raise MetricError(f"{arch}: no such open_clip model config")
            open_clip.add_model_config(arch)
            arch = Path(arch).stem
        key = ("hps", files.hps, arch)
        if key not in _cache:
            state = load_state_dict(files.hps)
            try:
                model = open_clip.create_model(arch, pretrained=None, device="cpu")    # random init, no download
            except RuntimeError as error:
                raise MetricError(f"--hps-architecture {arch}: {error}") from None
            _load_part(model, {k: v.float() for k, v in state.items()}, files.hps, f"HPS v2 ({arch})")
            _cache[key] = (model.eval(), open_clip.get_tokenizer(arch))
        self.model, self.tokenizer = _cache[key]
        size = self.model.visual.image_size
        self.size = size if isinstance(size, int) else int(max(size))

    def pixels(self, image: np.ndarray) -> torch.Tensor:
        """HPS v2's evaluation transform: the longer side resized to the model's size (bicubic), padded with black to
        a square (the padding split as the reference's ResizeMaxSize), CLIP normalisation."""
        from torchvision.transforms import functional as F

        x = torch.from_numpy(np.ascontiguousarray(image, np.float32)).permute(2, 0, 1)
        h, w = x.shape[1:]
        scale = self.size / max(h, w)
        if scale != 1.0:
            nh, nw = round(h * scale), round(w * scale)
            x = F.resize(x, [nh, nw], interpolation=F.InterpolationMode.BICUBIC)
            ph, pw = self.size - nh, self.size - nw
            x = F.pad(x, [pw // 2, ph // 2, pw - pw // 2, ph - ph // 2], fill=0)
        return F.normalize(x, CLIP_MEAN, CLIP_STD)[None]

    @torch.no_grad()
    def compute(self, inp: MetricInput) -> dict:
        image = self.model.encode_image(self.pixels(inp.output), normalize=True)
        text = self.model.encode_text(self.tokenizer([inp.case.prompt]), normalize=True)
        return {self.name: float((image * text).sum())}


class ToyBlobs(Metric):
    """The toy world's scorer on the exact result cells (the variant's array output)."""
    name, fields = "toy", ("present", "dominant", "shape_ok", "mae", "changed", "blob_cells", "shape", "failure")

    def compute(self, inp: MetricInput) -> dict:
        from faithful_inpaint.kernels import toy_world as tw

        score = tw.score_case(inp.array, inp.case.meta["toy"])
        score["failure"] = tw.failure_kind(inp.array, inp.case.meta["toy"], score)
        return {k: plain(v) for k, v in score.items()}


def plain(value):
    """A JSON-exact Python value: numpy bools, ints and floats as bool, int, float."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    return value


METRICS = ("clip_score", "clip_accuracy", "aesthetic", "clip_similarity", "psnr_unmasked", "mse_unmasked",
           "ssim_unmasked", "lpips_unmasked", "clip_i", "dino", "pickscore", "image_reward", "hps_v2", "toy")
# The metrics computed "where the user has the files": a paper table adds them when their file is given.
OPTIONAL_FILES = {"pickscore": "pickscore", "image_reward": "image_reward", "hps_v2": "hps"}


def make_metrics(names, files: MetricFiles, class_names=None) -> list[Metric]:
    """The named metrics, their models loaded now (so a wrong file fails before anything is generated)."""
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise MetricError(f"unknown metric(s) {unknown}; known: {', '.join(METRICS)}")
    makers = {"clip_score": lambda: ClipScore(files), "clip_accuracy": lambda: ClipAccuracy(files, class_names),
              "aesthetic": lambda: Aesthetic(files), "clip_similarity": lambda: ClipScore(files, "clip_similarity",
                                                                                          local=False),
              "psnr_unmasked": PSNRUnmasked, "mse_unmasked": MSEUnmasked, "ssim_unmasked": SSIMUnmasked,
              "lpips_unmasked": lambda: LPIPSUnmasked(files), "clip_i": lambda: ClipSubject(files),
              "dino": lambda: Dino(files), "pickscore": lambda: PickScore(files),
              "image_reward": lambda: ImageReward(files), "hps_v2": lambda: HPSv2(files), "toy": ToyBlobs}
    return [makers[n]() for n in dict.fromkeys(names)]
