"""Tiny random-weight model folders in diffusers layout, for tests and benchmarks.

Each builder writes ``model_index.json`` plus one subfolder per component with
``save_pretrained`` so that loading goes through exactly the code path a user's
model folder takes. Tokenizers are built from a byte-level vocabulary written on
the fly (no hub access needed).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

_CLIP_SPECIAL = ("<|startoftext|>", "<|endoftext|>")


def _byte_chars() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for raw bytes."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    keep += list(range(ord("®"), ord("ÿ") + 1))
    chars = [chr(b) for b in keep]
    extra = 0
    for b in range(256):
        if b not in keep:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def write_clip_tokenizer(folder: Path, max_length: int = 77) -> None:
    """A CLIP tokenizer whose vocabulary is single byte-characters (no merges)."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    chars = _byte_chars()
    vocab = {c: i for i, c in enumerate(chars)}
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    for tok in _CLIP_SPECIAL:
        vocab[tok] = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length, pad_token="<|endoftext|>")
    tok.save_pretrained(folder)


def build_tiny_clip(folder: Path, *, seed: int = 0, image_size: int = 32) -> Path:
    """A CLIP model folder (model, tokenizer, image processor) laid out as ``openai/clip-vit-*`` repos are.

    For ``--pretrained_evaluation_model_name_or_path``: text and vision towers of 2 layers, 32 wide,
    patches of 8 pixels on ``image_size``-pixel inputs, the byte-level tokenizer of
    :func:`write_clip_tokenizer`.
    """
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    torch.manual_seed(seed)
    text = _clip_config().to_dict()
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                  image_size=image_size, patch_size=8)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(folder)
    write_clip_tokenizer(folder)
    CLIPImageProcessorPil(size={"shortest_edge": image_size},
                          crop_size={"height": image_size, "width": image_size}).save_pretrained(folder)
    return folder


def tiny_unet_config(*, cross_attention_dim: int = 32, sdxl: bool = False, size: str = "tiny",
                     sample_size: int = 16) -> dict[str, Any]:
    """UNet2DConditionModel config: ``tiny`` for tests, ``sdxl`` for the real SDXL layout."""
    if size == "sdxl":
        return dict(
            sample_size=128, in_channels=4, out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(320, 640, 1280), layers_per_block=2,
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
            cross_attention_dim=2048, use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        )
    config: dict[str, Any] = dict(
        sample_size=sample_size, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
        attention_head_dim=(2, 4), cross_attention_dim=cross_attention_dim,
    )
    if sdxl:
        config.update(
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
            # pooled text projection (32) + 6 time ids * 8
            projection_class_embeddings_input_dim=32 + 6 * 8,
        )
    return config


def _tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=8, sample_size=32,
    )


def _clip_config(hidden: int = 32, projection: int | None = None):
    from transformers import CLIPTextConfig

    extra = {"projection_dim": projection} if projection else {}
    return CLIPTextConfig(
        vocab_size=520, hidden_size=hidden, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=512, eos_token_id=513,
        pad_token_id=513, **extra,
    )


def _scheduler(prediction_type: str = "epsilon"):
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                         beta_end=0.012, prediction_type=prediction_type, clip_sample=False, steps_offset=1)


def _save(folder: Path, pipeline_cls: str, components: dict[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    index: dict[str, Any] = {"_class_name": pipeline_cls, "_diffusers_version": "0.42.1"}
    for name, comp in components.items():
        if comp is None:
            index[name] = [None, None]
            continue
        comp.save_pretrained(folder / name)
        module = type(comp).__module__.split(".")[0]
        index[name] = [module, type(comp).__name__]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


def build_tiny_sd(folder: Path, *, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """An SD 1.x/2.x-shaped pipeline folder (one CLIP text encoder)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**tiny_unet_config())
    vae = _tiny_vae()
    te = CLIPTextModel(_clip_config())
    folder = _save(folder, "StableDiffusionPipeline", {
        "unet": unet, "vae": vae, "text_encoder": te, "scheduler": _scheduler(prediction_type),
        "safety_checker": None, "feature_extractor": None,
    })
    write_clip_tokenizer(folder / "tokenizer")
    _add_index(folder, "tokenizer", "transformers", "CLIPTokenizer")
    index = json.loads((folder / "model_index.json").read_text())
    index["requires_safety_checker"] = False
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


def build_tiny_sdxl(folder: Path, *, seed: int = 0) -> Path:
    """An SDXL-shaped pipeline folder (two CLIP encoders, pooled embeds, add_time_ids)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**tiny_unet_config(cross_attention_dim=64, sdxl=True))
    folder = _save(folder, "StableDiffusionXLPipeline", {
        "unet": unet, "vae": _tiny_vae(), "text_encoder": CLIPTextModel(_clip_config(32)),
        "text_encoder_2": CLIPTextModelWithProjection(_clip_config(32, projection=32)),
        "scheduler": _scheduler(),
    })
    for name in ("tokenizer", "tokenizer_2"):
        write_clip_tokenizer(folder / name)
        _add_index(folder, name, "transformers", "CLIPTokenizer")
    return folder


def build_tiny_sdxl_refiner(folder: Path, *, seed: int = 0) -> Path:
    """An SDXL-refiner-shaped pipeline folder: ``text_encoder_2`` alone, aesthetic-score time ids (5 values)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = tiny_unet_config(cross_attention_dim=32, sdxl=True)
    config["projection_class_embeddings_input_dim"] = 32 + 5 * config["addition_time_embed_dim"]
    folder = _save(folder, "StableDiffusionXLImg2ImgPipeline", {
        "unet": UNet2DConditionModel(**config), "vae": _tiny_vae(), "text_encoder": None, "tokenizer": None,
        "text_encoder_2": CLIPTextModelWithProjection(_clip_config(32, projection=32)), "scheduler": _scheduler(),
    })
    write_clip_tokenizer(folder / "tokenizer_2")
    _add_index(folder, "tokenizer_2", "transformers", "CLIPTokenizer")
    index = json.loads((folder / "model_index.json").read_text())
    index.update(requires_aesthetics_score=True, force_zeros_for_empty_prompt=False)
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


def tiny_if_unet_config(*, stage: int = 1, text_dim: int = 32) -> dict[str, Any]:
    """A DeepFloyd IF ``UNet2DConditionModel`` config (the layout of diffusers' IF test models): RGB in,
    ε and variance out (6 channels), T5 states projected by ``encoder_hid_dim``; stage II also takes the
    upscaled low-resolution image (6 input channels) and a noise-level class embedding."""
    config: dict[str, Any] = dict(
        sample_size=32, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        in_channels=3, out_channels=6, cross_attention_dim=32, encoder_hid_dim=text_dim, attention_head_dim=8,
        addition_embed_type="text", addition_embed_type_num_heads=2, cross_attention_norm="group_norm",
        resnet_time_scale_shift="scale_shift", act_fn="gelu", norm_num_groups=8,
    )
    if stage == 2:
        config.update(in_channels=6, class_embed_type="timestep", mid_block_scale_factor=1.414,
                      time_embedding_act_fn="gelu", time_embedding_dim=32)
    return config


def _if_scheduler(*, learned_variance: bool = True):
    """IF's cosine DDPM schedule; the denoising scheduler reads the learned variance and thresholds."""
    from diffusers import DDPMScheduler

    extra = dict(thresholding=True, dynamic_thresholding_ratio=0.95, sample_max_value=1.0,
                 prediction_type="epsilon", variance_type="learned_range") if learned_variance else {}
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", **extra)


def build_tiny_deepfloyd(folder: Path, *, stage: int = 1, seed: int = 0) -> Path:
    """A DeepFloyd-IF-shaped pipeline folder (pixel space, no VAE): T5 encoder, IF UNet, IF schedulers.
    Stage 2 writes an ``IFSuperResolutionPipeline`` folder (with its ``image_noising_scheduler``)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    components: dict[str, Any] = {
        "unet": UNet2DConditionModel(**tiny_if_unet_config(stage=stage)), "text_encoder": tiny_t5_encoder(32),
        "scheduler": _if_scheduler(), "safety_checker": None, "feature_extractor": None, "watermarker": None,
    }
    if stage == 2:
        components["image_noising_scheduler"] = _if_scheduler(learned_variance=False)
    folder = _save(folder, "IFSuperResolutionPipeline" if stage == 2 else "IFPipeline", components)
    write_t5_tokenizer(folder / "tokenizer")
    _add_index(folder, "tokenizer", "transformers", "T5TokenizerFast")
    index = json.loads((folder / "model_index.json").read_text())
    index["requires_safety_checker"] = False
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


def write_chatglm_tokenizer(folder: Path) -> None:
    """A ChatGLM tokenizer over a tiny sentencepiece model trained here on a few sentences."""
    import io

    import sentencepiece as spm
    from diffusers.pipelines.kolors.tokenizer import ChatGLMTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    text = "\n".join(
        f"a photo of a {c} {t} on a {s} background number {n}"
        for c in ("red", "blue", "green", "small", "large") for t in ("cat", "dog", "cube", "ball")
        for s in ("white", "black") for n in range(3)
    )
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text.splitlines()), model_writer=model,
                                   vocab_size=320, model_type="bpe", character_coverage=1.0,
                                   byte_fallback=True, minloglevel=2)
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    tok = ChatGLMTokenizer(vocab_file=str(folder / "tokenizer.model"))
    tok.save_pretrained(folder)


def build_tiny_kolors(folder: Path, *, seed: int = 0) -> Path:
    """A Kolors-shaped pipeline folder (ChatGLM text encoder, SDXL-style UNet)."""
    from diffusers import UNet2DConditionModel
    from diffusers.pipelines.kolors.text_encoder import ChatGLMConfig, ChatGLMModel

    torch.manual_seed(seed)
    unet_cfg = tiny_unet_config(cross_attention_dim=32, sdxl=True)
    unet_cfg.update(encoder_hid_dim=32, encoder_hid_dim_type="text_proj")
    unet = UNet2DConditionModel(**unet_cfg)
    te_cfg = ChatGLMConfig(num_layers=2, padded_vocab_size=400, hidden_size=32, ffn_hidden_size=64,
                           kv_channels=8, num_attention_heads=4, seq_length=256,
                           multi_query_attention=True, multi_query_group_num=2, add_qkv_bias=True,
                           original_rope=True, torch_dtype="float32")
    te = ChatGLMModel(te_cfg)
    _init_chatglm(te)
    folder = _save(folder, "KolorsPipeline", {
        "unet": unet, "vae": _tiny_vae(), "text_encoder": te, "scheduler": _scheduler(),
    })
    write_chatglm_tokenizer(folder / "tokenizer")
    _add_index(folder, "tokenizer", "kolors", "ChatGLMTokenizer")
    index = json.loads((folder / "model_index.json").read_text())
    index["text_encoder"] = ["kolors", "ChatGLMModel"]
    index["force_zeros_for_empty_prompt"] = False
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


@torch.no_grad()
def _init_chatglm(model: torch.nn.Module) -> None:
    """ChatGLM defines no weight init, so a freshly built one holds uninitialised memory."""
    for name, param in model.named_parameters():
        if "layernorm" in name:
            param.fill_(1.0)
        elif name.endswith("bias"):
            param.zero_()
        else:
            param.normal_(0.0, 0.02)


def _add_index(folder: Path, name: str, library: str, cls: str) -> None:
    index = json.loads((folder / "model_index.json").read_text())
    index[name] = [library, cls]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))



def write_t5_tokenizer(folder: Path) -> None:
    """A T5 tokenizer (unigram, ``</s>`` appended) over single characters with and without the word marker."""
    import string

    from transformers import T5TokenizerFast

    chars = string.ascii_lowercase + string.ascii_uppercase + string.digits + string.punctuation
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + c, -3.0) for c in chars] + [(c, -4.0) for c in chars]
    T5TokenizerFast(vocab=vocab, extra_ids=0).save_pretrained(folder)


def tiny_t5_encoder(d_model: int = 32):
    """A two-layer ``T5EncoderModel`` whose vocabulary fits :func:`write_t5_tokenizer`."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=200, d_model=d_model, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                                   relative_attention_num_buckets=8, dropout_rate=0.0, pad_token_id=0,
                                   eos_token_id=1, decoder_start_token_id=0))


def _tiny_flow_vae(scaling_factor: float = 1.5305, shift_factor: float = 0.0609):
    """A 16-channel VAE with a latent shift and scale (SD3's by default; Flux passes its own)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=8, sample_size=32, scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=False, use_post_quant_conv=False,
    )


def tiny_sd3_transformer_config(size: str = "tiny") -> dict[str, Any]:
    """``SD3Transformer2DModel`` config: ``tiny`` for tests (one dual-attention block, RMS q/k norm as in
    3.5 Medium), ``medium``/``large`` for the real SD 3.5 layouts (the hub configs' numbers)."""
    if size == "large":
        return dict(sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64,
                    num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
                    pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192, qk_norm="rms_norm")
    if size == "medium":
        return dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                    pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384, qk_norm="rms_norm",
                    dual_attention_layers=tuple(range(13)))
    # CLIP widths 16 + 24: pooled 40, sequence padded up to the T5 width 48
    return dict(sample_size=16, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8,
                num_attention_heads=2, joint_attention_dim=48, caption_projection_dim=16,
                pooled_projection_dim=40, out_channels=16, pos_embed_max_size=32, qk_norm="rms_norm",
                dual_attention_layers=(0,))


def build_tiny_sd3(folder: Path, *, seed: int = 0) -> Path:
    """An SD3-shaped pipeline folder: CLIP-L/G stand-ins with projections, T5, MMDiT, 16-channel VAE."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    folder = _save(folder, "StableDiffusion3Pipeline", {
        "transformer": SD3Transformer2DModel(**tiny_sd3_transformer_config()),
        "vae": _tiny_flow_vae(),
        "text_encoder": CLIPTextModelWithProjection(_clip_config(16, projection=16)),
        "text_encoder_2": CLIPTextModelWithProjection(_clip_config(24, projection=24)),
        "text_encoder_3": tiny_t5_encoder(48),
        "scheduler": FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
    })
    for name in ("tokenizer", "tokenizer_2"):
        write_clip_tokenizer(folder / name)
        _add_index(folder, name, "transformers", "CLIPTokenizer")
    write_t5_tokenizer(folder / "tokenizer_3")
    _add_index(folder, "tokenizer_3", "transformers", "T5TokenizerFast")
    return folder


def tiny_flux_transformer_config(size: str = "tiny", *, joint_attention_dim: int = 32,
                                 pooled_projection_dim: int = 32) -> dict[str, Any]:
    """FluxTransformer2DModel config: ``tiny`` for tests, ``flux`` for the real FLUX.1-dev layout (12B)."""
    if size == "flux":
        return dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                    guidance_embeds=True, axes_dims_rope=(16, 56, 56))
    return dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
                num_attention_heads=2, joint_attention_dim=joint_attention_dim,
                pooled_projection_dim=pooled_projection_dim, guidance_embeds=True, axes_dims_rope=(4, 6, 6))


def build_tiny_flux(folder: Path, *, seed: int = 0) -> Path:
    """A FLUX.1-shaped pipeline folder: CLIP (pooled) + T5, a guidance-distilled transformer, 16-channel VAE."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    folder = _save(folder, "FluxPipeline", {
        "transformer": FluxTransformer2DModel(**tiny_flux_transformer_config()),
        "vae": _tiny_flow_vae(scaling_factor=0.3611, shift_factor=0.1159),
        "text_encoder": CLIPTextModel(_clip_config(32)), "text_encoder_2": tiny_t5_encoder(32),
        "scheduler": scheduler,
    })
    write_clip_tokenizer(folder / "tokenizer")
    _add_index(folder, "tokenizer", "transformers", "CLIPTokenizer")
    write_t5_tokenizer(folder / "tokenizer_2")
    _add_index(folder, "tokenizer_2", "transformers", "T5TokenizerFast")
    return folder
