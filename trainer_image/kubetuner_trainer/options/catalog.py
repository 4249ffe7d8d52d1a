"""Every trainer option of the SimpleTuner option language, plus kubetuner's own.

This is the single source of truth: the trainer CLI, config loading, the CRD schema and
``docs/options.md`` are all generated from ``OPTIONS``. Each entry follows the spec
(``shared/spec/simpletuner-options.ja.md``): the usage listing at its end and the options
described only in its sections. Help texts are our own words.

Conventions:
- ``default=None`` means "unset"; the trainer (or a library) then picks its own value.
- a ``bool`` option whose default is ``None`` is tri-state: unset means "decide automatically".
- choices that are numbers are stored as numbers of the option's type.
- regenerate the reference after editing: ``python -m kubetuner_trainer.options.docs --write``.
"""

from __future__ import annotations

from ..contract import DEFAULT_METRICS_PORT
from .model import Option, Upstream

# Group keys in the order the CLI help and the docs show them.
GROUP_TITLES: dict[str, str] = {
    "core": "Core model",
    "precision": "Precision & quantization",
    "memory": "Offloading & memory",
    "publishing": "Publishing",
    "data": "Data storage & caching",
    "processing": "Image & text processing",
    "validation": "Validation & evaluation",
    "training": "Training parameters",
    "optimizer": "Optimizer",
    "lr_schedule": "Learning-rate schedule",
    "advanced": "Advanced optimization",
    "ema": "EMA (exponential moving average)",
    "loss": "Loss & noise",
    "timesteps": "Timesteps & flow schedule",
    "lora": "LoRA & LyCORIS",
    "crepa": "CREPA (cross-frame representation alignment)",
    "layersync": "LayerSync",
    "scheduled_sampling": "Scheduled sampling",
    "checkpointing": "Checkpointing & resume",
    "logging": "Logging & monitoring",
    "families": "Model-family specifics",
    "controlnet": "ControlNet, control & distillation",
    "environment": "Environment & launch",
    "kubetuner": "kubetuner",
}

# The model families of the usage listing (kept in its order).
MODEL_FAMILIES = (
    "kolors", "auraflow", "omnigen", "flux", "deepfloyd", "cosmos2image", "sana", "qwen_image",
    "pixart_sigma", "sdxl", "sd1x", "sd2x", "wan", "hidream", "sd3", "lumina2", "ltxvideo",
)
# The section text also names ``legacy`` (the older name for the SD 1.x/2.x family).
MODEL_FAMILY_CHOICES = (*MODEL_FAMILIES, "legacy")
# Families SimpleTuner 3.1.6 registers (helpers/models/*/model.py) that the option spec does not list.
SIMPLETUNER_ONLY_FAMILIES = (
    "ace_step", "chroma", "flux2", "hunyuanvideo", "kandinsky5-image", "kandinsky5-video", "sanavideo",
    "stable_cascade", "z-image",
)

# Quantization presets of the usage listing, then the SDNQ levels the precision section names.
PRECISION_PRESETS = (
    "no_change", "int8-quanto", "int4-quanto", "int2-quanto", "int8-torchao", "nf4-bnb",
    "int4-torchao", "fp8-quanto", "fp8uz-quanto", "fp8-torchao",
)
SDNQ_PRESETS = (
    "uint8-sdnq", "uint16-sdnq", "int16-sdnq", "fp16-sdnq", "int8-sdnq", "int7-sdnq", "int6-sdnq",
    "int5-sdnq", "uint5-sdnq", "uint4-sdnq", "uint3-sdnq", "uint2-sdnq",
)
QUANTIZATION_CHOICES = PRECISION_PRESETS + SDNQ_PRESETS

# Optimizers of the usage listing, then those only the sections name (bitsandbytes, SDNQ).
OPTIMIZERS = (
    "adamw_bf16", "ao-adamw8bit", "ao-adamw4bit", "ao-adamfp8", "ao-adamwfp8", "adamw_schedulefree",
    "adamw_schedulefree+aggressive", "adamw_schedulefree+no_kahan", "optimi-stableadamw",
    "optimi-adamw", "optimi-lion", "optimi-radam", "optimi-ranger", "optimi-adan", "optimi-adam",
    "optimi-sgd", "soap", "prodigy",
)
BNB_OPTIMIZERS = (
    "bnb-adagrad", "bnb-adagrad8bit", "bnb-adam", "bnb-adam8bit", "bnb-adamw", "bnb-adamw8bit",
    "bnb-adamw-paged", "bnb-adamw8bit-paged", "bnb-lion", "bnb-lion8bit", "bnb-lion-paged",
    "bnb-lion8bit-paged", "bnb-ademamix", "bnb-ademamix8bit", "bnb-ademamix-paged",
    "bnb-ademamix8bit-paged",
)
SDNQ_OPTIMIZERS = (
    "sdnq-adamw", "sdnq-adamw+no_quant", "sdnq-adafactor", "sdnq-came", "sdnq-lion", "sdnq-muon",
    "sdnq-muon+quantized_matmul",
)
OPTIMIZER_CHOICES = OPTIMIZERS + BNB_OPTIMIZERS + SDNQ_OPTIMIZERS

LR_SCHEDULERS = (
    "linear", "sine", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
)
ATTENTION_MECHANISMS = (
    "diffusers", "xformers", "flash-attn", "flash-attn-2", "flash-attn-3", "flash-attn-3-varlen", "flex",
    "cudnn", "native-efficient", "native-flash", "native-math", "native-npu", "native-xla", "sla",
    "sageattention", "sageattention-int8-fp16-triton", "sageattention-int8-fp16-cuda",
    "sageattention-int8-fp8-cuda",
)
FLUX_LORA_TARGETS = (
    "mmdit", "context", "context+ffs", "all", "all+ffs", "ai-toolkit", "tiny", "nano", "controlnet",
    "all+ffs+embedder", "all+ffs+embedder+controlnet",
)
VALIDATION_NOISE_SCHEDULERS = ("ddim", "ddpm", "euler", "euler-a", "unipc", "dpm++", "perflow")
TIMESTEP_SPACINGS = ("leading", "linspace", "trailing")
REPORT_TARGETS = ("tensorboard", "wandb", "comet_ml", "all", "none")
DYNAMO_BACKENDS = ("no", "inductor", "aot_eager", "cudagraphs", "eager")
DYNAMO_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

OPTIONS: list[Option] = [
    # ------------------------------------------------------------------ core model
    Option("model_family", "str", "core",
           "Which model architecture is trained; decides the pipeline, text encoders and defaults.",
           choices=MODEL_FAMILY_CHOICES, required=True, upstream=Upstream(choices=SIMPLETUNER_ONLY_FAMILIES)),
    Option("model_flavour", "str", "core",
           "A named variant inside the chosen family (for example a specific release); picks its default weights."),
    Option("model_type", "str", "core",
           "lora trains a small adapter on top of frozen weights; full updates every weight of the model.",
           default="lora", choices=("full", "lora"), required=True, upstream=Upstream(
               why="kubetuner's option spec states lora: an unintended full fine-tune costs many times the memory and time.",
               default="full")),
    Option("pretrained_model_name_or_path", "str", "core",
           "Base weights: a Hugging Face repository id, a local folder, or a single .safetensors file "
           "(SDXL, Flux, SD3). Unset uses the flavour's usual repository."),
    Option("pretrained_vae_model_name_or_path", "str", "core",
           "Load the VAE from this repository or folder instead of the one bundled with the base model.",
           upstream=Upstream(
               why="kubetuner loads the VAE that ships with the base model and never downloads a second repository unasked (air-gapped clusters); name the fp16-fix VAE to use it.",
               default="madebyollin/sdxl-vae-fp16-fix")),
    Option("pretrained_transformer_model_name_or_path", "str", "core",
           "Take the transformer weights from this repository or folder instead of the base model's."),
    Option("pretrained_transformer_subfolder", "str", "core",
           "Folder inside the transformer source that holds its weights.",
           upstream=Upstream(default="transformer")),
    Option("pretrained_unet_model_name_or_path", "str", "core",
           "Take the UNet weights from this repository or folder instead of the base model's."),
    Option("pretrained_unet_subfolder", "str", "core",
           "Folder inside the UNet source that holds its weights.", upstream=Upstream(default="unet")),
    Option("pretrained_t5_model_name_or_path", "str", "core",
           "Where to fetch the T5 text encoder (e.g. for PixArt), so switching base models does not "
           "download it again."),
    Option("pretrained_gemma_model_name_or_path", "str", "core",
           "Where to fetch the Gemma text encoder for Gemma-based families (Sana, Lumina2, LTX-2)."),
    Option("revision", "str", "core",
           "Git revision (branch, tag or commit) of the base model repository to load."),
    Option("variant", "str", "core",
           "File variant of the base weights to load, such as fp16 or bf16."),
    Option("prediction_type", "str", "core",
           "What the network predicts: noise (epsilon), velocity (v_prediction), the clean sample, or a "
           "flow-matching target. Unset follows the model family.",
           choices=("epsilon", "v_prediction", "sample", "flow_matching")),
    Option("output_dir", "str", "core",
           "Folder that receives checkpoints, logs and the final weights.", required=True,
           upstream=Upstream(
               why="A pod's output must land on a volume the operator mounts, so the folder is always given (the operator sets it).",
               default="simpletuner-results")),

    # ------------------------------------------------------------------ precision & quantization
    Option("mixed_precision", "str", "precision",
           "Number format used for the forward and backward computation (no keeps full fp32).", default="bf16",
           choices=("no", "fp16", "bf16", "fp8")),
    Option("base_model_precision", "str", "precision",
           "Quantize the trained model's weights on load to save memory (quanto, torchao, bitsandbytes or "
           "SDNQ presets); no_change keeps them as loaded.",
           default="no_change", choices=QUANTIZATION_CHOICES),
    Option("text_encoder_1_precision", "str", "precision",
           "Quantization preset for the first text encoder (pipeline order).", default="no_change",
           choices=QUANTIZATION_CHOICES),
    Option("text_encoder_2_precision", "str", "precision",
           "Quantization preset for the second text encoder (pipeline order).", default="no_change",
           choices=QUANTIZATION_CHOICES),
    Option("text_encoder_3_precision", "str", "precision",
           "Quantization preset for the third text encoder (pipeline order).", default="no_change",
           choices=QUANTIZATION_CHOICES),
    Option("text_encoder_4_precision", "str", "precision",
           "Quantization preset for the fourth text encoder (pipeline order).", default="no_change",
           choices=QUANTIZATION_CHOICES),
    Option("base_model_default_dtype", "str", "precision",
           "dtype for the base-model weights that stay unquantized.", default="bf16", choices=("bf16", "fp32")),
    Option("quantize_via", "str", "precision",
           "Where quantization runs: cpu (slow, about 30 s, low memory), accelerator (faster, may run out "
           "of memory on 24 GB cards), or pipeline (delegated to Diffusers at load time).",
           default="cpu", choices=("cpu", "accelerator", "pipeline"),
           upstream=Upstream(default="accelerator")),
    Option("quantization_config", "json", "precision",
           "Per-component quantization settings used with quantize_via=pipeline, keyed by component (unet, "
           "transformer, text_encoder, text_encoder_2, ...) or default (every other component); an entry names "
           "its library with quant_method or by its keys (load_in_4bit/load_in_8bit: bitsandbytes, quant_type: "
           "torchao, weights_dtype: quanto); inline JSON or a JSON file."),
    Option("quantize_activations", "bool", "precision",
           "Also quantize activations, not only weights, while training.", default=False),
    Option("vae_dtype", "str", "precision",
           "Number format of the VAE while encoding and decoding latents; default follows the model.", default="default",
           choices=("default", "fp32", "fp16", "bf16"), upstream=Upstream(
               why="kubetuner keeps the VAE in the dtype its weights were saved in unless asked, so cached latents match the published model.",
               default="bf16")),
    Option("disable_tf32", "bool", "precision",
           "Turn off TF32 matmuls so fp32 math is strict IEEE (slower on Ampere and newer).", default=False),

    # ------------------------------------------------------------------ offloading & memory
    Option("gradient_checkpointing", "bool", "memory",
           "Recompute activations during the backward pass instead of storing them: much less VRAM, "
           "slower steps.", default=True),
    Option("gradient_checkpointing_interval", "int", "memory",
           "Checkpoint only every n-th block (1 equals plain gradient checkpointing). Must be above 0; "
           "honoured by SDXL and Flux only.", minimum=1),
    Option("offload_during_startup", "bool", "memory",
           "Keep the text encoders on the CPU while the VAE cache is built, to avoid running out of memory "
           "with huge models; startup gets slower.", default=False),
    Option("offload_during_save", "bool", "memory",
           "Move the whole pipeline to the CPU while a checkpoint is written, to survive the memory spike "
           "of serializing quantized weights.", default=False),
    Option("delete_model_after_load", "bool", "memory",
           "Remove the downloaded base model from the Hugging Face cache once it is loaded, trading the "
           "next run's download for disk space.", default=False),
    Option("enable_model_cpu_offload", "bool", "memory",
           "Let Diffusers keep whole models on the CPU and move each to the accelerator only when used. "
           "Cannot be combined with group offloading.", default=False),
    Option("enable_group_offload", "bool", "memory",
           "Offload groups of layers to CPU (or disk) between forward passes via Diffusers (0.33 or "
           "newer). Excludes model CPU offload and RamTorch.", default=False),
    Option("group_offload_type", "str", "memory",
           "How layers are grouped for offloading: block_level balances memory and speed, leaf_level "
           "saves the most memory with more transfers.",
           default="block_level", choices=("block_level", "leaf_level")),
    Option("group_offload_blocks_per_group", "int", "memory",
           "Transformer blocks moved together as one group with block_level offloading; more means fewer "
           "transfers but more resident memory.", default=1, minimum=1),
    Option("group_offload_use_stream", "bool", "memory",
           "Overlap offload transfers with compute on a separate CUDA stream; other backends fall back "
           "to plain copies.", default=False),
    Option("group_offload_to_disk_path", "str", "memory",
           "Spill offloaded groups to files in this folder instead of system RAM (use a fast local SSD)."),
    Option("musubi_blocks_to_swap", "int", "memory",
           "Keep this many final transformer blocks off the accelerator and stream their weights in per "
           "block (Musubi-style swap); 0 turns it off.", default=0, minimum=0),
    Option("musubi_block_swap_device", "str", "memory",
           "Device string where swapped blocks wait, e.g. cpu or cuda:1; only used when blocks are "
           "swapped.", default="cpu"),
    Option("ramtorch", "bool", "memory",
           "Replace Linear layers with RamTorch versions whose weights live in CPU memory and stream to "
           "the GPU (CUDA/ROCm only). Excludes group offload; turns on set_grads_to_none.", default=False),
    Option("ramtorch_target_modules", "str", "memory",
           "Comma-separated glob patterns (module or class names) restricting which Linear layers "
           "RamTorch converts; unset converts all."),
    Option("ramtorch_text_encoder", "bool", "memory",
           "Also convert every text-encoder Linear layer to RamTorch.", default=False),
    Option("ramtorch_vae", "bool", "memory",
           "Experimental: convert only the Linear layers in the VAE mid block to RamTorch.", default=False),
    Option("ramtorch_controlnet", "bool", "memory",
           "Convert the ControlNet's Linear layers to RamTorch when a ControlNet is trained.", default=False),
    Option("accelerator_cache_clear_interval", "int", "memory",
           "Empty the accelerator's memory cache every N steps, as a guard against creeping memory use.",
           minimum=1),
    Option("unet_attention_slice", "bool", "memory",
           "Compute SDXL UNet attention in slices to lower peak memory.", default=False),
    Option("vae_enable_slicing", "bool", "memory",
           "Run the VAE over a batch one slice at a time to cut its memory use.", default=False),
    Option("vae_enable_tiling", "bool", "memory",
           "Run the VAE over large images tile by tile to cut its memory use.", default=False),
    Option("vae_enable_patch_conv", "bool", "memory",
           "Use patched 3D convolutions in the HunyuanVideo VAE: lower peak VRAM at a small speed cost.",
           default=False),
    Option("keep_vae_loaded", "bool", "memory",
           "Leave the VAE resident on the accelerator after caching; less disk churn, more VRAM.",
           default=False),
    Option("fully_unload_text_encoder", "bool", "memory",
           "Free the text encoders from memory entirely whenever they are not needed.", default=False),
    Option("offload_param_path", "str", "memory",
           "Folder where offloaded parameters are stored."),

    # ------------------------------------------------------------------ publishing
    Option("push_to_hub", "bool", "publishing",
           "Upload the finished model to a Hugging Face Hub repository when training ends.", default=False),
    Option("push_to_hub_background", "bool", "publishing",
           "Do Hub uploads from a background worker so training and validation keep running; the last "
           "upload is awaited before exit so failures still surface.", default=False),
    Option("push_checkpoints_to_hub", "bool", "publishing",
           "Also upload each intermediate checkpoint to the Hub repository.", default=False),
    Option("hub_model_id", "str", "publishing",
           "Repository name on the Hub and name of the result folder under output_dir; derived from the "
           "project when unset."),
    Option("publishing_config", "json", "publishing",
           "Extra publishing targets besides the Hub (S3-compatible storage, Backblaze B2, Azure Blob, "
           "Dropbox); inline JSON or a JSON file. Runs on the main process after validation."),
    Option("post_upload_script", "str", "publishing",
           "Command run asynchronously after each upload (per provider); accepts the same placeholders as "
           "validation_external_script plus {remote_checkpoint_path}. Failures are logged, not fatal."),
    Option("model_card_private", "bool", "publishing",
           "Create the Hub repository as private.", default=True),
    Option("model_card_safe_for_work", "bool", "publishing",
           "Leave out the NSFW notice that the generated model card carries otherwise.", default=False),
    Option("model_card_note", "str", "publishing",
           "Short free text shown first on the model card that gets generated."),
    Option("modelspec_comment", "str", "publishing",
           "Text stored as modelspec.comment in the safetensors metadata of each saved file; a list of "
           "strings becomes several lines, and {env:NAME} is replaced by that environment variable."),

    # ------------------------------------------------------------------ data storage & caching
    Option("data_backend_config", "str", "data",
           "Path to the dataset list (multidatabackend.json) describing every dataset and its storage.",
           required=True),
    Option("override_dataset_config", "bool", "data",
           "Accept a dataset whose cached settings differ from the current ones instead of refusing; "
           "risky, prefer fixing the mismatch.", default=False),
    Option("data_backend_sampling", "str", "data",
           "How datasets are drawn from: auto-weighting balances them by size, uniform uses only the "
           "manual probability weights.", default="auto-weighting", choices=("uniform", "auto-weighting")),
    Option("allow_dataset_oversubscription", "bool", "data",
           "Raise a dataset's repeats automatically when a bucket holds fewer samples than one effective "
           "batch (batch size x GPUs x accumulation); explicit repeats are never changed.", default=False),
    Option("vae_cache_scan_behaviour", "str", "data",
           "How inconsistencies found by a cache scan are fixed: recreate rebuilds the entries, sync "
           "rewrites the bucket metadata to match.", default="recreate", choices=("recreate", "sync")),
    Option("vae_cache_ondemand", "bool", "data",
           "Encode latents during training instead of caching them all beforehand.", default=False),
    Option("vae_cache_disable", "bool", "data",
           "Never write latents to disk; implies on-demand encoding.", default=False),
    Option("vae_batch_size", "int", "data",
           "Images encoded per VAE call while the latent cache is built.", default=4, minimum=1),
    Option("cache_dir", "str", "data",
           "Folder for downloaded models and datasets."),
    Option("cache_dir_text", "str", "data",
           "Local folder holding the text-embedding cache.", upstream=Upstream(
               why="Unset, the text-embedding cache lives under --cache_dir (or the output folder), which the operator puts on a persistent volume.",
               default="cache")),
    Option("cache_dir_vae", "str", "data",
           "Local folder holding the cached VAE latents."),
    Option("compress_disk_cache", "bool", "data",
           "Compress cached latents and text embeddings on disk (often 40% smaller, up to 75%); delete an "
           "existing cache so it is rebuilt compressed.", default=True),
    Option("preserve_data_backend_cache", "bool", "data",
           "Skip the startup scan of a dataset by reusing its stored file lists; only safe for storage "
           "that never changes.", default=False),
    Option("skip_file_discovery", "str", "data",
           "Comma-separated discovery stages to skip (aspect, vae, text, metadata); faster resumes at the "
           "risk of missing broken or mis-bucketed files.",
           choices=("aspect", "vae", "text", "metadata"), multiple=True),
    Option("ignore_missing_files", "bool", "data",
           "Keep going when files listed in a cache no longer exist.", default=False),
    Option("delete_unwanted_images", "bool", "data",
           "Delete images below the minimum size from storage to reclaim space.", default=False),
    Option("delete_problematic_images", "bool", "data",
           "Delete images that fail to load from the underlying storage.", default=False),
    Option("disable_bucket_pruning", "bool", "data",
           "Keep aspect buckets that hold fewer images than one batch, for tiny datasets; can skew "
           "epoch accounting.", default=False),
    Option("aspect_bucket_disable_rebuild", "bool", "data",
           "Do not rebuild the aspect-bucket list every epoch when bucket order is randomised.",
           default=False),
    Option("image_processing_batch_size", "int", "data",
           "Images queued at once for parallel resizing and cropping.", minimum=1,
           upstream=Upstream(default=32)),
    Option("write_batch_size", "int", "data",
           "Small objects grouped per write while caching, which helps S3 and shared filesystems.",
           default=64, minimum=1, upstream=Upstream(
               why="kubetuner's option spec states 64; the value only groups small cache writes.",
               default=128)),
    Option("read_batch_size", "int", "data",
           "Images read ahead by the VAE cache.", minimum=1, upstream=Upstream(default=25)),
    Option("enable_multiprocessing", "bool", "data",
           "Use processes rather than threads for metadata caching.", default=False),
    Option("max_workers", "int", "data",
           "Threads or processes working in parallel while the VAE cache is built.", default=32, minimum=1),
    Option("aws_max_pool_connections", "int", "data",
           "Upper bound on simultaneous connections to an S3 bucket.", default=128, minimum=1),
    Option("torch_num_threads", "int", "data",
           "Threads PyTorch may use for CPU operations (separate from data workers).", minimum=1,
           upstream=Upstream(default=8)),
    Option("dataloader_prefetch", "bool", "data",
           "Fetch upcoming batches (latents, embeddings, metadata) ahead of time; only worth it when I/O "
           "is the bottleneck.", default=False),
    Option("dataloader_prefetch_qlen", "int", "data",
           "Batches held in the prefetch queue per process.", default=10, minimum=1),
    Option("aspect_bucket_worker_count", "int", "data",
           "Workers that sort images into aspect buckets; CPU-bound, so about the number of CPU threads.",
           default=12, minimum=1),
    Option("metadata_update_interval", "int", "data",
           "Seconds between saves of the aspect-bucket index while it is built.", default=3600, minimum=1),

    # ------------------------------------------------------------------ image & text processing
    Option("resolution", "float", "processing",
           "Training resolution used when a dataset sets none: pixels (e.g. 1024) or megapixels, read "
           "according to resolution_type.", default=1024.0, minimum=0),
    Option("resolution_type", "str", "processing",
           "How resolution is read: pixel sizes the short edge, pixel_area turns pixels into an equal area, "
           "area means megapixels (deprecated in favour of pixel_area).", default="pixel_area",
           choices=("pixel", "area", "pixel_area")),
    Option("aspect_bucket_rounding", "int", "processing",
           "Decimal places kept when aspect ratios are rounded into buckets.", default=2, choices=tuple(range(1, 10))),
    Option("aspect_bucket_alignment", "int", "processing",
           "Bucket image sizes are multiples of this many pixels.", default=64, choices=(8, 16, 24, 32, 64)),
    Option("minimum_image_size", "float", "processing",
           "Images whose sides fall below this (pixels or megapixels, per resolution_type) are skipped.",
           minimum=0),
    Option("maximum_image_size", "float", "processing",
           "Images larger than this are downsampled before cropping so a crop keeps the scene; pixels or "
           "megapixels per resolution_type.", minimum=0),
    Option("target_downsample_size", "float", "processing",
           "Size that oversized images (see maximum_image_size) are shrunk to before cropping.", minimum=0),
    Option("max_upscale_threshold", "float", "processing",
           "Largest upscale allowed for small images, as a fraction (0.2 = 20%); buckets that need more "
           "are dropped. Unset allows any upscale.", minimum=0, maximum=1),
    Option("caption_strategy", "str", "processing",
           "Where captions come from: a .txt next to each image, the file name, a parquet column, or the "
           "dataset's instance prompt.", default="filename",
           choices=("filename", "textfile", "instance_prompt", "parquet", "instanceprompt")),
    Option("conditioning_multidataset_sampling", "str", "processing",
           "With several conditioning datasets: combined feeds all of them together, random picks one "
           "per sample.", default="random", choices=("combined", "random")),
    Option("instance_prompt", "str", "processing",
           "Prompt used for the images when captions come from the instance prompt."),
    Option("prepend_instance_prompt", "bool", "processing",
           "Put the instance prompt in front of every caption derived from file names.", default=False),
    Option("only_instance_prompt", "bool", "processing",
           "Ignore file-name captions and train every image on the instance prompt alone.", default=False),
    Option("parquet_caption_column", "str", "processing",
           "Parquet column read for captions (caption when unset)."),
    Option("parquet_filename_column", "str", "processing",
           "Parquet column holding each image's path."),
    Option("caption_dropout_probability", "float", "processing",
           "Chance that a sample's caption (and, for SDXL, its size conditioning) is dropped, which "
           "teaches unconditional generation.", default=0.1, minimum=0, maximum=1),
    Option("tokenizer_max_length", "int", "processing",
           "Override the number of tokens a prompt is padded or cut to (advanced).", minimum=1),

    # ------------------------------------------------------------------ validation & evaluation
    Option("validation_step_interval", "int", "validation",
           "Render validation images every N optimizer steps.", default=100, aliases=("validation_steps",), minimum=1),
    Option("validation_epoch_interval", "int", "validation",
           "Render validation images every N epochs.", minimum=1),
    Option("validation_method", "str", "validation",
           "simpletuner-local renders with the built-in pipeline; external-script hands validation to "
           "validation_external_script.",
           default="simpletuner-local", choices=("simpletuner-local", "external-script")),
    Option("validation_external_script", "str", "validation",
           "Command for validation_method=external-script, split like a shell line; placeholders such as "
           "{local_checkpoint_path}, {global_step}, {model_family} or any validation_* value are filled in."),
    Option("validation_external_background", "bool", "validation",
           "Start the external validation command and carry on training without waiting or checking its "
           "exit code.", default=False),
    Option("validation_disable", "bool", "validation",
           "Turn validation rendering off entirely.", default=False),
    Option("disable_benchmark", "bool", "validation",
           "Skip the start-up render of the untouched base model that is shown beside later validation "
           "images (false: kept in validation/benchmark/, each later image also written as "
           "<name>-benchmark.png, base on the left).", default=True,
           upstream=Upstream(default=False, why="the benchmark is one more validation round before training and "
                                                "doubles the width of every image trackers show; kubetuner "
                                                "renders it when asked.")),
    Option("validation_on_startup", "bool", "validation",
           "Render one validation round with the base model before the first step.", default=False),
    Option("validation_prompt", "str", "validation",
           "Prompt rendered at each validation."),
    Option("validation_negative_prompt", "str", "validation",
           "Negative prompt used for validation renders.", default="blurry, cropped, ugly"),
    Option("validation_prompt_library", "bool", "validation",
           "Add SimpleTuner's bundled set of prompts to the validation prompts.", default=False),
    Option("user_prompt_library", "str", "validation",
           "Path to a JSON file with your own named validation prompts."),
    Option("num_validation_images", "int", "validation",
           "Images rendered for every validation prompt.", default=1, minimum=1),
    Option("validation_resolution", "str", "validation",
           "Size of validation renders: pixels, megapixels or WIDTHxHEIGHT; several comma-separated "
           "values render each.", default="256"),
    Option("validation_num_inference_steps", "int", "validation",
           "Sampling steps per validation render.", default=30, minimum=1),
    Option("validation_guidance", "float", "validation",
           "Classifier-free guidance scale for validation renders.", default=7.5),
    Option("validation_guidance_real", "float", "validation",
           "Real CFG scale for guidance-distilled models such as FLUX schnell.", default=1.0),
    Option("validation_guidance_rescale", "float", "validation",
           "CFG rescale factor applied to validation renders.", default=0.0, minimum=0),
    Option("validation_no_cfg_until_timestep", "int", "validation",
           "Flux only: skip classifier-free guidance for the first N sampling timesteps (not built: "
           "diffusers' FluxPipeline applies real CFG on every step and has no such argument).", minimum=0,
           upstream=Upstream(default=2)),
    Option("validation_disable_unconditional", "bool", "validation",
           "Do not render the unconditional image (the empty prompt, named unconditional) first in every "
           "validation; video families never render it.", default=True,
           upstream=Upstream(default=False, why="the unconditional render adds one render per resolution to every "
                                                "validation; SimpleTuner's own examples mostly turn it off.")),
    Option("validation_guidance_skip_layers", "json", "validation",
           "Transformer layers left out of the guidance pass (skip-layer guidance), as a JSON list."),
    Option("validation_guidance_skip_layers_start", "float", "validation",
           "Where in sampling skip-layer guidance begins (fraction of the steps).", default=0.01),
    Option("validation_guidance_skip_layers_stop", "float", "validation",
           "Where in sampling skip-layer guidance ends (fraction of the steps).", default=0.2),
    Option("validation_guidance_skip_scale", "float", "validation",
           "Guidance strength applied while layers are skipped.", default=2.8),
    Option("validation_noise_scheduler", "str", "validation",
           "Sampler used for validation renders; unset follows the model.",
           choices=VALIDATION_NOISE_SCHEDULERS),
    Option("validation_seed", "int", "validation",
           "Fixed seed so validation images stay comparable between rounds."),
    Option("validation_randomize", "bool", "validation",
           "Draw a new random seed at every validation.", default=False),
    Option("validation_seed_source", "str", "validation",
           "Device whose random generator produces the validation noise.", default="cpu", choices=("cpu", "gpu")),
    Option("validation_using_datasets", "bool", "validation",
           "Validate on images sampled from the training datasets (img2img-style models).", default=False,
           upstream=Upstream(default=None)),
    Option("validation_stitch_input_location", "str", "validation",
           "Side on which the input image is attached to img2img validation results.",
           choices=("left", "right"), upstream=Upstream(default="left")),
    Option("validation_torch_compile", "bool", "validation",
           "Compile the validation pipeline with torch.compile for faster renders.", default=False),
    Option("validation_lycoris_strength", "float", "validation",
           "Multiplier applied to a LyCORIS adapter while validating.", minimum=0,
           upstream=Upstream(default=1.0)),
    Option("validation_num_video_frames", "int", "validation",
           "Frames rendered per validation video.", minimum=1),
    Option("validation_adapter_path", "str", "validation",
           "A LoRA loaded only while validating: org/repo, org/repo:file.safetensors, or a local file or "
           "folder. Cannot be combined with validation_adapter_config."),
    Option("validation_adapter_name", "str", "validation",
           "Label for the temporary validation adapter, shown in logs and the UI."),
    Option("validation_adapter_strength", "float", "validation",
           "Strength of the temporary validation adapter; must be above 0.", default=1.0, minimum=0),
    Option("validation_adapter_mode", "str", "validation",
           "adapter_only validates with the adapter, comparison renders base and adapter side by side, "
           "none ignores the adapter.", default="adapter_only", choices=("adapter_only", "comparison", "none")),
    Option("validation_adapter_config", "json", "validation",
           "Several adapter runs to validate one after another (a list, or an object with runs; each entry "
           "may set label, path, adapter_name, strength, adapters/paths); inline JSON or a file."),
    Option("validation_preview", "bool", "validation",
           "Stream intermediate previews during validation sampling, decoded with a Tiny AutoEncoder and "
           "sent to webhooks (families with a Tiny AutoEncoder only; not built: kubetuner's families name no "
           "Tiny AutoEncoder yet).", default=False),
    Option("validation_preview_steps", "int", "validation",
           "Decode and send a preview every N sampling steps.", default=1, minimum=1),
    Option("evaluation_type", "str", "validation",
           "clip scores every validation render against its prompt (CLIP score, 0-100) and reports "
           "clip/mean, min, max, std and per-prompt scores to trackers, metrics and webhooks; none turns "
           "scoring off.", default="none", choices=("none", "clip")),
    Option("pretrained_evaluation_model_name_or_path", "str", "validation",
           "CLIP model used by evaluation_type=clip: a hub id or a local folder with the model, its tokenizer "
           "and image processor.", default="openai/clip-vit-large-patch14-336"),
    Option("eval_steps_interval", "int", "validation",
           "Run evaluation every N optimizer steps.", minimum=1),
    Option("eval_epoch_interval", "float", "validation",
           "Run evaluation every N epochs; fractions such as 0.5 evaluate several times per epoch.",
           minimum=0),
    Option("num_eval_images", "int", "validation",
           "With evaluation_type=clip: the most validation renders scored per validation, in render order; "
           "unset scores every render.", minimum=1,
           upstream=Upstream(default=4, why="SimpleTuner 3.1.6 scores every validation prompt whatever this "
                                            "says and uses its 4 to cap the evaluation-loss batches; kubetuner's "
                                            "evaluation loss uses every held-out sample.")),
    Option("eval_timesteps", "int", "validation",
           "Timesteps at which the evaluation loss is measured.", default=28, minimum=1),
    Option("eval_dataset_id", "str", "validation",
           "Restrict evaluation to the dataset with this id."),
    Option("eval_dataset_pooling", "bool", "validation",
           "Merge the evaluation results of all datasets into one chart.", default=False),
    Option("eval_loss_disable", "bool", "validation",
           "Skip the evaluation loss that evaluation datasets otherwise produce; CLIP scoring still "
           "runs.", default=False),
    Option("enable_watermark", "bool", "validation",
           "Embed an invisible watermark in generated images.", default=False),

    # ------------------------------------------------------------------ training parameters
    Option("num_train_epochs", "int", "training",
           "Passes over the whole dataset; 0 lets max_train_steps decide when to stop.", minimum=0,
           upstream=Upstream(
               why="SimpleTuner's 1 caps every run at one epoch unless num_train_epochs is set (its examples "
                   "write 0 beside max_train_steps); unset, kubetuner lets max_train_steps decide and trains one "
                   "epoch only when neither is set.",
               default=1)),
    Option("max_train_steps", "int", "training",
           "Optimizer steps after which training stops; 0 lets num_train_epochs decide.", minimum=0),
    Option("ignore_final_epochs", "bool", "training",
           "Keep training until max_train_steps even if the epoch count runs out first (e.g. after the "
           "dataset shrank).", default=False),
    Option("train_batch_size", "int", "training",
           "Samples per device in each forward/backward pass.", default=4, minimum=1),
    Option("gradient_accumulation_steps", "int", "training",
           "Micro-batches whose gradients are summed before one optimizer step; saves memory, costs time. "
           "Do not combine with fused backward passes.", default=1, minimum=1),
    Option("seed", "int", "training",
           "Random seed that makes a run reproducible.", default=0, upstream=Upstream(
               why="Unset, SimpleTuner draws a random seed; kubetuner uses seed 0 so that a resumed pod continues the exact same data order, noise and dropout.",
               default=None)),
    Option("seed_for_each_device", "bool", "training",
           "Derive a distinct deterministic seed per GPU instead of one shared seed.", default=True),
    Option("train_text_encoder", "bool", "training",
           "Train the text encoder as well as the diffusion model.", default=False),
    Option("save_text_encoder", "bool", "training",
           "Write the text encoder into the saved result.", default=False),
    Option("text_encoder_limit", "int", "training",
           "Stop training the text encoder after this many steps to avoid wrecking it.", minimum=0,
           upstream=Upstream(default=100)),
    Option("freeze_encoder_strategy", "str", "training",
           "Which text-encoder layers stay frozen relative to the freeze_encoder_before/after bounds.",
           choices=("before", "between", "after"), upstream=Upstream(default="after")),
    Option("freeze_encoder_before", "int", "training",
           "Layer index below which text-encoder layers are frozen (before/between strategies).",
           upstream=Upstream(default=12)),
    Option("freeze_encoder_after", "int", "training",
           "Layer index above which text-encoder layers are frozen (after/between strategies).",
           upstream=Upstream(default=17)),
    Option("layer_freeze_strategy", "str", "training",
           "bitfit trains only the bias terms; none freezes nothing extra.", choices=("none", "bitfit")),

    # ------------------------------------------------------------------ optimizer
    Option("optimizer", "str", "optimizer",
           "Optimizer that updates the trained parameters (some need NVIDIA hardware).", default="adamw_bf16",
           choices=OPTIMIZER_CHOICES, required=True),
    Option("optimizer_config", "str", "optimizer",
           "Extra optimizer settings as comma-separated key=value pairs, e.g. d_coef=0.1 for prodigy."),
    Option("optimizer_beta1", "float", "optimizer",
           "beta1 (first-moment decay) for optimizers that take one.", minimum=0, maximum=1),
    Option("optimizer_beta2", "float", "optimizer",
           "beta2 (second-moment decay) for optimizers that take one.", minimum=0, maximum=1),
    Option("adam_beta1", "float", "optimizer",
           "beta1 for Adam-style optimizers.", default=0.9, minimum=0, maximum=1),
    Option("adam_beta2", "float", "optimizer",
           "beta2 for Adam-style optimizers.", default=0.999, minimum=0, maximum=1),
    Option("adam_weight_decay", "float", "optimizer",
           "Weight decay (decoupled L2 penalty) for Adam-style optimizers.", default=0.01, minimum=0),
    Option("adam_epsilon", "float", "optimizer",
           "Epsilon added to the denominator of Adam-style updates to keep them stable.", default=1e-08, minimum=0),
    Option("prodigy_steps", "int", "optimizer",
           "Steps during which Prodigy keeps adjusting its learning-rate estimate.", minimum=0),
    Option("max_grad_norm", "float", "optimizer",
           "Clip gradients at this threshold to stop them from exploding.", default=2.0, minimum=0),
    Option("grad_clip_method", "str", "optimizer",
           "Clip by overall norm or clamp individual values when applying max_grad_norm.", default="value",
           choices=("value", "norm")),
    Option("gradient_precision", "str", "optimizer",
           "Keep gradients in fp32, or leave them in the training dtype (unmodified).",
           choices=("unmodified", "fp32")),
    Option("optimizer_cpu_offload_method", "str", "optimizer",
           "How optimizer state is offloaded to the CPU; only none exists.", choices=("none",)),
    Option("optimizer_offload_gradients", "bool", "optimizer",
           "Keep gradients in CPU memory to save VRAM.", default=False),
    Option("fuse_optimizer", "bool", "optimizer",
           "Use fused optimizer kernels while offloading, lowering memory overhead.", default=False),
    Option("optimizer_release_gradients", "bool", "optimizer",
           "With Optimi optimizers, free each gradient right after its update.", default=False),
    Option("set_grads_to_none", "bool", "optimizer",
           "Reset gradients to None rather than zero-filled tensors between steps.", default=False),

    # ------------------------------------------------------------------ learning-rate schedule
    Option("learning_rate", "float", "lr_schedule",
           "Peak learning rate reached after warmup. Typical: 1e-7 to 1e-6 for full, 1e-5 to 1e-3 for "
           "LoRA.", default=4e-07, minimum=0),
    Option("lr_scheduler", "str", "lr_schedule",
           "Shape of the learning rate over time; polynomial with warmup is the recommended choice.",
           default="constant_with_warmup", choices=LR_SCHEDULERS),
    Option("lr_warmup_steps", "int", "lr_schedule",
           "Steps over which the learning rate rises from 0 to learning_rate.", default=0, minimum=0),
    Option("lr_num_cycles", "int", "lr_schedule",
           "Restarts used by cosine_with_restarts.", default=1, minimum=1),
    Option("lr_power", "float", "lr_schedule",
           "Exponent of the polynomial schedule.", default=0.8),
    Option("lr_end", "float", "lr_schedule",
           "Final learning rate the polynomial schedule decays to.", default=4e-07, minimum=0),
    Option("lr_scale", "bool", "lr_schedule",
           "Multiply the learning rate by GPUs x accumulation steps x batch size.", default=False),
    Option("lr_scale_sqrt", "bool", "lr_schedule",
           "With lr_scale, multiply by the square root of that product instead.", default=False),
    Option("text_encoder_lr", "float", "lr_schedule",
           "Own learning rate for the text encoder when it is trained.", minimum=0),

    # ------------------------------------------------------------------ advanced optimization
    Option("attention_mechanism", "str", "advanced",
           "Attention kernel: diffusers (PyTorch SDPA), xformers, FlashAttention 1/2/3, flex, native SDPA "
           "backends, SLA, or SageAttention (meant for inference).",
           default="diffusers", choices=ATTENTION_MECHANISMS),
    Option("sageattention_usage", "str", "advanced",
           "Where SageAttention is used. Training with it leaves QKV projections without gradients, so "
           "prefer inference only.", choices=("training", "inference", "training+inference"),
           upstream=Upstream(default="inference")),
    Option("sla_config", "json", "advanced",
           "Overrides for Sparse-Linear Attention runtime settings (e.g. topk, blkq), as JSON or a "
           "Python-dict literal; used with attention_mechanism=sla."),
    Option("fuse_qkv_projections", "bool", "advanced",
           "Fuse the Q, K and V projections of attention blocks; needs Flash Attention 3 (H100/H200), "
           "otherwise SDPA is used.", default=False),
    Option("tread_config", "json", "advanced",
           "Settings for TREAD token routing during training (random image tokens skip a range of "
           "transformer blocks): {\"routes\": [{\"selection_ratio\", \"start_layer_idx\", \"end_layer_idx\"}]}, "
           "inline JSON or a file."),
    Option("i_know_what_i_am_doing", "bool", "advanced",
           "Allow experimental combinations and lift built-in safety limits.", default=False),

    # ------------------------------------------------------------------ EMA
    Option("use_ema", "bool", "ema",
           "Keep an exponential moving average of the weights for steadier results, at extra memory and "
           "a little time.", default=False),
    Option("ema_device", "str", "ema",
           "Where EMA weights live between updates: accelerator is fastest, cpu saves VRAM.",
           default="cpu", choices=("accelerator", "cpu")),
    Option("ema_cpu_only", "bool", "ema",
           "With ema_device=cpu, update the EMA on the CPU instead of moving it to the accelerator.",
           default=False),
    Option("ema_update_interval", "int", "ema",
           "Update the EMA only every N optimizer steps to reduce its overhead.", default=1, minimum=1),
    Option("ema_foreach_disable", "bool", "ema",
           "Use per-tensor updates instead of torch._foreach kernels, for backends where those misbehave.",
           default=False),
    Option("ema_decay", "float", "ema",
           "EMA smoothing factor: 0.999 is very stable and slow to follow, 0.99 adapts faster.", default=0.995,
           minimum=0, maximum=1),
    Option("ema_validation", "str", "ema",
           "Which weights validation uses: none (training weights), ema_only, or comparison of both.", default="comparison",
           choices=("none", "ema_only", "comparison")),

    # ------------------------------------------------------------------ loss & noise
    Option("loss_type", "str", "loss",
           "Loss function: l2 (mean squared error), huber or smooth_l1.", default="l2", choices=("l2", "huber", "smooth_l1")),
    Option("huber_schedule", "str", "loss",
           "How the Huber threshold changes across timesteps.", default="snr", choices=("snr", "exponential", "constant")),
    Option("huber_c", "float", "loss",
           "Huber threshold where the loss turns from quadratic to linear.", default=0.1, minimum=0),
    Option("snr_gamma", "float", "loss",
           "Min-SNR loss weighting gamma; 5 is the paper's value, 1 to 20 is sensible, unset or 0 turns it "
           "off.", minimum=0),
    Option("use_soft_min_snr", "bool", "loss",
           "Use the softer soft-min-SNR weighting (near essential for pixel models like DeepFloyd).",
           default=False),
    Option("soft_min_snr_sigma_data", "float", "loss",
           "sigma_data term of the soft-min-SNR weighting."),
    Option("snr_weight", "float", "loss",
           "Scale applied to the SNR-based loss weighting.", upstream=Upstream(default=1.0)),
    Option("masked_loss_probability", "float", "loss",
           "Chance per batch that the mask-weighted loss is used.", default=1.0, minimum=0, maximum=1),
    Option("noise_offset", "float", "loss",
           "Strength of offset noise added during training.", default=0.1, minimum=0),
    Option("noise_offset_probability", "float", "loss",
           "Chance per step that the noise offset is applied.", default=0.25, minimum=0, maximum=1),
    Option("offset_noise", "bool", "loss",
           "Turn on offset-noise training.", default=False),
    Option("input_perturbation", "float", "loss",
           "Extra noise mixed only into the model's inputs during training.", default=0.0, minimum=0),
    Option("input_perturbation_steps", "int", "loss",
           "Apply input perturbation only over the first N steps, fading out linearly.", default=0, minimum=0),
    Option("rescale_betas_zero_snr", "bool", "loss",
           "Rescale the noise schedule so the last timestep reaches zero SNR.", default=False),
    Option("diff2flow_enabled", "bool", "loss",
           "Experimental: bridge epsilon or v-prediction models to flow-matching targets without changing "
           "the model.", default=False),
    Option("diff2flow_loss", "bool", "loss",
           "Compute the loss against the flow target (noise minus latents) instead of the native one; "
           "requires diff2flow_enabled.", default=False),

    # ------------------------------------------------------------------ timesteps & flow schedule
    Option("timestep_bias_strategy", "str", "timesteps",
           "Favour earlier or later timesteps, or a range, when sampling them; none samples evenly.",
           choices=("earlier", "later", "range", "none")),
    Option("timestep_bias_begin", "int", "timesteps",
           "First timestep of the favoured range (range strategy).", default=0, minimum=0),
    Option("timestep_bias_end", "int", "timesteps",
           "Last timestep of the favoured range (range strategy).", default=1000, minimum=0),
    Option("timestep_bias_multiplier", "float", "timesteps",
           "How much more likely the favoured timesteps are.", default=1.0, minimum=0),
    Option("timestep_bias_portion", "float", "timesteps",
           "Share of the schedule that earlier/later biasing covers.", default=0.25, minimum=0, maximum=1),
    Option("disable_segmented_timestep_sampling", "bool", "timesteps",
           "Sample each batch's timesteps freely instead of one per segment of the schedule.",
           default=False),
    Option("training_scheduler_timestep_spacing", "str", "timesteps",
           "Timestep spacing of the noise scheduler used for training.", choices=TIMESTEP_SPACINGS,
           upstream=Upstream(default="trailing")),
    Option("inference_scheduler_timestep_spacing", "str", "timesteps",
           "Timestep spacing of the scheduler used for validation sampling.", choices=TIMESTEP_SPACINGS,
           upstream=Upstream(default="trailing")),
    Option("flow_sigmoid_scale", "float", "timesteps",
           "Scale of the sigmoid distribution flow-matching timesteps are drawn from.", default=1.0),
    Option("flow_use_uniform_schedule", "bool", "timesteps",
           "Draw flow-matching timesteps uniformly instead of from a sigmoid.", default=False),
    Option("flow_use_beta_schedule", "bool", "timesteps",
           "Draw flow-matching timesteps from a beta distribution instead of a sigmoid.", default=False),
    Option("flow_beta_schedule_alpha", "float", "timesteps",
           "alpha of the beta timestep distribution.", default=2.0, minimum=0),
    Option("flow_beta_schedule_beta", "float", "timesteps",
           "beta of the beta timestep distribution.", default=2.0, minimum=0),
    Option("flow_schedule_shift", "float", "timesteps",
           "Shift applied to the flow-matching schedule (higher values favour noisier timesteps); 0 turns "
           "it off.", default=3.0, minimum=0),
    Option("flow_schedule_auto_shift", "bool", "timesteps",
           "Pick the schedule shift from the image resolution.", default=False),

    # ------------------------------------------------------------------ LoRA & LyCORIS
    Option("lora_type", "str", "lora",
           "standard uses PEFT LoRA; lycoris uses the LyCORIS library (LoKr etc.).",
           default="standard", choices=("standard", "lycoris")),
    Option("lora_format", "str", "lora",
           "File layout of saved and loaded LoRA weights: diffusers (PEFT) or comfyui (diffusion_model.* "
           "keys with .alpha). ComfyUI input is auto-detected for some families either way.",
           default="diffusers", choices=("diffusers", "comfyui")),
    Option("lora_rank", "int", "lora",
           "Rank (inner dimension) of the LoRA matrices.", default=16, minimum=1),
    Option("lora_alpha", "float", "lora",
           "LoRA scaling numerator; the update is scaled by alpha / rank.", minimum=0),
    Option("lora_dropout", "float", "lora",
           "Dropout probability inside the LoRA layers, a guard against overfitting.", default=0.1,
           minimum=0, maximum=1),
    Option("lora_init_type", "str", "lora",
           "How LoRA weights are initialised.", default="default", choices=("default", "gaussian", "loftq", "olora", "pissa")),
    Option("peft_lora_mode", "str", "lora",
           "Variant of PEFT LoRA to train: standard or SingLoRA.", choices=("standard", "singlora"),
           upstream=Upstream(default="standard")),
    Option("peft_lora_target_modules", "json", "lora",
           "Module names PEFT LoRA attaches to, replacing the family preset; a JSON list or a JSON file."),
    Option("singlora_ramp_up_steps", "int", "lora",
           "Steps over which SingLoRA ramps its update in.", minimum=0, upstream=Upstream(default=0)),
    Option("slider_lora_target", "bool", "lora",
           "Aim standard PEFT LoRA at slider-style targets (self-attention plus conv and time "
           "embeddings).", default=False),
    Option("init_lora", "str", "lora",
           "Start the adapter from an existing LoRA or LyCORIS .safetensors file."),
    Option("lycoris_config", "json", "lora",
           "LyCORIS algorithm settings; a JSON file (or inline JSON).",
           upstream=Upstream(default="config/lycoris_config.json")),
    Option("init_lokr_norm", "float", "lora",
           "Scale of the perturbed-normal initialisation for LyCORIS LoKr layers."),
    Option("use_dora", "bool", "lora",
           "Train DoRA, which splits weights into magnitude and direction.", default=False),
    Option("flux_lora_target", "str", "lora",
           "Preset of Flux layers the LoRA is attached to.", choices=FLUX_LORA_TARGETS, default="all"),

    # ------------------------------------------------------------------ CREPA
    Option("crepa_enabled", "bool", "crepa",
           "Turn on CREPA: align hidden states with pretrained visual features of neighbouring frames "
           "for temporal consistency (video families only).", default=False),
    Option("crepa_block_index", "int", "crepa",
           "Transformer block whose hidden states are aligned; earlier blocks tend to work better. "
           "Required when CREPA is on.", minimum=0),
    Option("crepa_lambda", "float", "crepa",
           "Weight of the CREPA alignment loss relative to the main loss.", default=0.5, minimum=0),
    Option("crepa_adjacent_distance", "int", "crepa",
           "Frame distance d of the neighbours each frame is aligned with.", default=1, minimum=1),
    Option("crepa_adjacent_tau", "float", "crepa",
           "Temperature of the exponential distance weighting; smaller focuses on the closest frames.",
           default=1.0, minimum=0),
    Option("crepa_cumulative_neighbors", "bool", "crepa",
           "Align with every frame from distance 1 to d instead of only distance d.", default=False),
    Option("crepa_normalize_by_frames", "bool", "crepa",
           "Divide the alignment loss by the frame count so its scale does not grow with video length.",
           default=True),
    Option("crepa_spatial_align", "bool", "crepa",
           "Interpolate token grids when model and encoder disagree on size; off falls back to global "
           "pooling.", default=True),
    Option("crepa_model", "str", "crepa",
           "DINOv2 encoder that supplies the target features; smaller ones save memory.",
           default="dinov2_vitg14", choices=("dinov2_vitg14", "dinov2_vitb14", "dinov2_vits14")),
    Option("crepa_encoder_frames_batch_size", "int", "crepa",
           "Frames the feature encoder processes at once; 0 or less means all frames together.", default=-1),
    Option("crepa_use_backbone_features", "bool", "crepa",
           "Align with a deeper block of the diffusion model itself instead of loading an external "
           "encoder.", default=False),
    Option("crepa_teacher_block_index", "int", "crepa",
           "Teacher block used with backbone features; unset reuses crepa_block_index.", minimum=0),
    Option("crepa_encoder_image_size", "int", "crepa",
           "Input resolution of the feature encoder in pixels.", default=518, minimum=1),
    Option("crepa_scheduler", "str", "crepa",
           "How the CREPA weight decays over training.", default="constant",
           choices=("constant", "linear", "cosine", "polynomial")),
    Option("crepa_warmup_steps", "int", "crepa",
           "Steps over which the CREPA weight rises linearly from 0 to crepa_lambda.", default=0, minimum=0),
    Option("crepa_decay_steps", "int", "crepa",
           "Length of the decay after warmup; 0 spreads it over the whole run.", default=0, minimum=0),
    Option("crepa_lambda_end", "float", "crepa",
           "CREPA weight once the decay is complete (0 switches CREPA off by the end).",
           default=0.0, minimum=0),
    Option("crepa_power", "float", "crepa",
           "Exponent of the polynomial decay (1 linear, 2 quadratic).", default=1.0, minimum=0),
    Option("crepa_cutoff_step", "int", "crepa",
           "Step after which CREPA is switched off; 0 means never.", default=0, minimum=0),
    Option("crepa_similarity_threshold", "float", "crepa",
           "Switch CREPA off once the moving average of the alignment similarity reaches this value; "
           "unset disables the check."),
    Option("crepa_similarity_ema_decay", "float", "crepa",
           "Decay of that similarity moving average (0.99 is roughly a 100-step window).",
           default=0.99, minimum=0, maximum=1),
    Option("crepa_threshold_mode", "str", "crepa",
           "After the similarity threshold hits: permanent keeps CREPA off, recoverable turns it back on "
           "when similarity drops.", default="permanent", choices=("permanent", "recoverable")),

    # ------------------------------------------------------------------ LayerSync
    Option("layersync_enabled", "bool", "layersync",
           "Align a student transformer block with a stronger teacher block of the same model by cosine "
           "similarity; costs a hidden-state buffer per step.", default=False),
    Option("layersync_student_block", "int", "layersync",
           "Student block index (1-based depth as in the paper, 0-based also accepted). Required when "
           "LayerSync is on.", minimum=0),
    Option("layersync_teacher_block", "int", "layersync",
           "Teacher block index, same numbering as the student; unset uses the student block itself.",
           minimum=0),
    Option("layersync_lambda", "float", "layersync",
           "Weight of the LayerSync alignment loss; must be above 0 when LayerSync is on (unset means "
           "0.2 then).", minimum=0),

    # ------------------------------------------------------------------ scheduled sampling
    Option("scheduled_sampling_max_step_offset", "int", "scheduled_sampling",
           "Longest rollout, in steps, in which the model produces its own input during training; 0 turns "
           "scheduled sampling off.", default=0, minimum=0),
    Option("scheduled_sampling_strategy", "str", "scheduled_sampling",
           "Distribution of rollout lengths: uniform, biased_early (shorter) or biased_late (longer).",
           default="uniform", choices=("uniform", "biased_early", "biased_late")),
    Option("scheduled_sampling_probability", "float", "scheduled_sampling",
           "Chance that a sample gets a non-zero rollout (0 never, 1 always).",
           default=0.0, minimum=0, maximum=1),
    Option("scheduled_sampling_prob_start", "float", "scheduled_sampling",
           "Rollout probability at the start of the ramp.", default=0.0, minimum=0, maximum=1),
    Option("scheduled_sampling_prob_end", "float", "scheduled_sampling",
           "Rollout probability at the end of the ramp.", default=0.5, minimum=0, maximum=1),
    Option("scheduled_sampling_ramp_steps", "int", "scheduled_sampling",
           "Steps taken to move from prob_start to prob_end; 0 means no ramp.", default=0, minimum=0),
    Option("scheduled_sampling_start_step", "float", "scheduled_sampling",
           "Global step at which the probability ramp begins.", default=0.0, minimum=0),
    Option("scheduled_sampling_ramp_shape", "str", "scheduled_sampling",
           "Curve of the probability ramp.", default="linear", choices=("linear", "cosine")),
    Option("scheduled_sampling_sampler", "str", "scheduled_sampling",
           "Solver that generates the rollout steps.", default="unipc",
           choices=("unipc", "euler", "dpm", "rk4")),
    Option("scheduled_sampling_order", "int", "scheduled_sampling",
           "Order of the rollout solver.", default=2, minimum=1),
    Option("scheduled_sampling_reflexflow", "bool", "scheduled_sampling",
           "ReflexFlow extras (anti-drift plus frequency-compensated weighting) for flow-matching "
           "rollouts; unset turns them on automatically when rollouts are used.", default=None),
    Option("scheduled_sampling_reflexflow_alpha", "float", "scheduled_sampling",
           "Scale of the frequency-compensation weights derived from exposure bias.", default=1.0, minimum=0),
    Option("scheduled_sampling_reflexflow_beta1", "float", "scheduled_sampling",
           "Weight of ReflexFlow's anti-drift (direction) regulariser.", default=10.0, minimum=0),
    Option("scheduled_sampling_reflexflow_beta2", "float", "scheduled_sampling",
           "Weight of ReflexFlow's frequency-compensation loss term (the paper's beta 2).",
           default=1.0, minimum=0),

    # ------------------------------------------------------------------ checkpointing & resume
    Option("checkpoint_step_interval", "int", "checkpointing",
           "Save a resumable checkpoint every N optimizer steps.", default=500, aliases=("checkpointing_steps",),
           minimum=1),
    Option("checkpoint_epoch_interval", "int", "checkpointing",
           "Also save a checkpoint after every N completed epochs.", minimum=1),
    Option("checkpoints_total_limit", "int", "checkpointing",
           "Keep at most this many checkpoints; older ones are deleted.", default=5, minimum=1),
    Option("checkpointing_rolling_steps", "int", "checkpointing",
           "Save a rolling checkpoint every N steps, kept in a separate window (0: none).", default=0, minimum=0),
    Option("checkpoints_rolling_total_limit", "int", "checkpointing",
           "How many rolling checkpoints are kept.", default=1, minimum=1),
    Option("checkpointing_use_tempdir", "bool", "checkpointing",
           "Write a checkpoint into a temporary folder first and move it into place when complete.",
           default=False),
    Option("resume_from_checkpoint", "str", "checkpointing",
           "Resume from this checkpoint folder, or latest for the newest one in output_dir.", default="latest"),
    Option("post_checkpoint_script", "str", "checkpointing",
           "Command run asynchronously on the main process right after a checkpoint is written (before "
           "any upload), with the validation_external_script placeholders."),

    # ------------------------------------------------------------------ logging & monitoring
    Option("logging_dir", "str", "logging",
           "Folder for TensorBoard event files.", default="logs"),
    Option("report_to", "str", "logging",
           "Experiment trackers that receive metrics, comma-separated (all enables every one, none "
           "disables reporting).", default="none", choices=REPORT_TARGETS, multiple=True),
    Option("tracker_project_name", "str", "logging",
           "Project the run is filed under in the trackers.", upstream=Upstream(
               why="Unset, trackers use kubetuner's own names (the TrainingJob's), not SimpleTuner's placeholder.",
               default="simpletuner")),
    Option("tracker_run_name", "str", "logging",
           "Name of this run in the trackers.", upstream=Upstream(
               why="Unset, the run is named after its output folder (the TrainingJob), which also names published models.",
               default="simpletuner-testing")),
    Option("tracker_image_layout", "str", "logging",
           "Show validation images as a gallery or a table in the trackers.", default="gallery", choices=("gallery", "table")),
    Option("webhook_config", "json", "logging",
           "Webhooks (Discord or custom endpoints) that receive training events; inline JSON or a file. "
           "SIMPLETUNER_JOB_ID fills the payload's job_id."),
    Option("webhook_reporting_interval", "int", "logging",
           "Seconds between periodic webhook progress reports.", default=30, minimum=1),
    Option("debug_aspect_buckets", "bool", "logging",
           "Log aspect-bucketing decisions in detail.", default=False),
    Option("debug_dataset_loader", "bool", "logging",
           "Log the data loader's work in detail.", default=False),
    Option("print_filenames", "bool", "logging",
           "Log each file name as it is processed, to find a corrupt image.", default=False),
    Option("print_sampler_statistics", "bool", "logging",
           "Log statistics about the dataset sampler.", default=False),

    # ------------------------------------------------------------------ model-family specifics
    Option("custom_text_encoder_intermediary_layers", "json", "families",
           "FLUX.2 only, experimental: JSON list of three text-encoder hidden layers to use (defaults "
           "[10, 20, 30] for dev, [9, 18, 27] for klein); changing it invalidates cached embeddings."),
    Option("flux_guidance_mode", "str", "families",
           "Flux guidance during training: one constant value or a random value in a range.",
           choices=("constant", "random-range"), default="constant"),
    Option("flux_guidance_value", "float", "families",
           "Guidance value used with flux_guidance_mode=constant.", default=1.0),
    Option("flux_guidance_min", "float", "families",
           "Lower bound of the random guidance range.", default=0.0),
    Option("flux_guidance_max", "float", "families",
           "Upper bound of the random guidance range.", default=4.0),
    Option("flux_fast_schedule", "bool", "families",
           "Experimental shortened timestep schedule for Flux.", default=False),
    Option("flux_attention_masked_training", "bool", "families",
           "Mask padding tokens in Flux attention while training.", default=False),
    Option("t5_padding", "str", "families",
           "Whether T5 padding tokens are zeroed or left as they are.", choices=("zero", "unmodified"),
           default="unmodified"),
    Option("sd3_clip_uncond_behaviour", "str", "families",
           "SD3: build unconditional CLIP inputs from an empty string or from zeros.",
           choices=("empty_string", "zero"), upstream=Upstream(default="empty_string")),
    Option("sd3_t5_uncond_behaviour", "str", "families",
           "SD3: build unconditional T5 inputs from an empty string or from zeros.",
           choices=("empty_string", "zero")),
    Option("hidream_use_load_balancing_loss", "bool", "families",
           "HiDream: add the experimental mixture-of-experts load-balancing loss.", default=False),
    Option("hidream_load_balancing_loss_weight", "float", "families",
           "HiDream: weight of the load-balancing loss.", minimum=0),
    Option("ltx_train_mode", "str", "families",
           "LTX Video: train text-to-video or image-to-video.", choices=("t2v", "i2v"), default="i2v"),
    Option("ltx_i2v_prob", "float", "families",
           "LTX Video: chance a sample is trained as image-to-video.", minimum=0, maximum=1, default=0.1),
    Option("ltx_partial_noise_fraction", "float", "families",
           "LTX Video: fraction of noise used for partial-noise training.", minimum=0, maximum=1, default=0.05),
    Option("ltx_protect_first_frame", "bool", "families",
           "LTX Video: keep the first frame free of noise.", default=False),
    Option("framerate", "int", "families",
           "Frames per second assumed for video training.", minimum=1),
    Option("sana_complex_human_instruction", "str", "families",
           "Sana: instruction text prepended to prompts (complex human instruction)."),
    Option("refiner_training", "bool", "families",
           "Train a refiner / mixture-of-experts stage of a model family.", default=False),
    Option("refiner_training_invert_schedule", "bool", "families",
           "Flip the timestep schedule for refiner training.", default=False),
    Option("refiner_training_strength", "float", "families",
           "Portion of the schedule the refiner stage covers.", minimum=0, maximum=1, default=0.2),
    Option("sdxl_refiner_uses_full_range", "bool", "families",
           "Let the SDXL refiner train on all timesteps instead of only the late ones.", default=False),
    Option("data_aesthetic_score", "float", "families",
           "Fixed aesthetic score fed to the SDXL refiner's conditioning.", default=7.0),

    # ------------------------------------------------------------------ ControlNet, control & distillation
    Option("controlnet", "bool", "controlnet",
           "Train ControlNet branches (full or LoRA) next to the main network.", default=False),
    Option("controlnet_model_name_or_path", "str", "controlnet",
           "Existing ControlNet weights to start from (a diffusers model folder or hub id); unset: the "
           "ControlNet is built from the base model's weights."),
    Option("controlnet_custom_config", "json", "controlnet",
           "Settings of the ControlNet built from the base model: keyword arguments of the family's diffusers "
           "constructor (from_unet/from_transformer), e.g. {\"num_layers\": 2}; inline JSON or a file."),
    Option("control", "bool", "controlnet",
           "Train channel-wise control: conditioning images are concatenated to the input channels.",
           default=False),
    Option("distillation_method", "str", "controlnet",
           "Distillation technique to train with.", choices=("lcm", "dcm", "dmd", "perflow")),
    Option("distillation_config", "json", "controlnet",
           "Settings for the chosen distillation method; inline JSON or a file."),

    # ------------------------------------------------------------------ environment & launch
    Option("num_processes", "int", "environment",
           "Training processes to launch, one per GPU (same as TRAINING_NUM_PROCESSES).",
           default=1, minimum=1),
    Option("dynamo_backend", "str", "environment",
           "torch.compile backend (same as TRAINING_DYNAMO_BACKEND); no runs uncompiled. The first steps "
           "are slower while compiling.", default="no", choices=DYNAMO_BACKENDS),
    Option("dynamo_mode", "str", "environment",
           "torch.compile optimisation mode such as max-autotune; unset keeps Accelerate's choice.",
           choices=DYNAMO_MODES),
    Option("dynamo_fullgraph", "bool", "environment",
           "Compile the model as one graph and fail on graph breaks; unset keeps Accelerate's default.",
           upstream=Upstream(default=False)),
    Option("dynamo_dynamic", "bool", "environment",
           "Compile with dynamic shapes; unset keeps Accelerate's default.",
           upstream=Upstream(default=False)),
    Option("dynamo_use_regional_compilation", "bool", "environment",
           "Compile repeated blocks once and reuse them, shortening cold starts of deep transformers; "
           "unset keeps Accelerate's default.", upstream=Upstream(default=False)),
    Option("local_rank", "int", "environment",
           "Rank of this process on its node; set by the launcher.", minimum=-1,
           upstream=Upstream(default=-1)),

    # ------------------------------------------------------------------ kubetuner
    Option("metrics_port", "int", "kubetuner",
           "Port of the trainer's Prometheus metrics endpoint; 0 turns it off.",
           default=DEFAULT_METRICS_PORT, minimum=0, maximum=65535),
    Option("metrics_host", "str", "kubetuner",
           "Address the metrics endpoint binds to.", default="0.0.0.0"),
    Option("stop_grace_seconds", "float", "kubetuner",
           "Seconds the trainer may spend after SIGTERM writing a final checkpoint and flushing uploads "
           "before it exits.", default=120.0, minimum=0),
]
