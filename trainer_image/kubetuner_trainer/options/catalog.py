"""Every trainer option (seed list; the full catalog replaces it)."""

from __future__ import annotations

from .model import Option

MODEL_FAMILIES = (
    "kolors", "auraflow", "omnigen", "flux", "deepfloyd", "cosmos2image", "sana", "qwen_image",
    "pixart_sigma", "sdxl", "sd1x", "sd2x", "wan", "hidream", "sd3", "lumina2", "ltxvideo",
)

OPTIONS: list[Option] = [
    Option("model_family", "str", "core", "Architecture family of the model being trained.",
           choices=MODEL_FAMILIES, required=True),
    Option("model_type", "str", "core", "Train a LoRA adapter or fine-tune all weights.",
           choices=("full", "lora"), default="lora", required=True),
    Option("output_dir", "str", "core", "Where checkpoints and the final model are written.", required=True),
    Option("optimizer", "str", "training", "Optimizer used for the trained parameters.",
           choices=("adamw_bf16", "prodigy"), required=True),
    Option("learning_rate", "float", "training", "Base learning rate after warmup.", default=1e-4, minimum=0),
    Option("num_train_epochs", "int", "training", "Epochs to train; 0 lets max_train_steps decide.",
           default=1, minimum=0),
    Option("max_train_steps", "int", "training", "Optimizer steps to train; 0 lets the epoch count decide.",
           default=0, minimum=0),
    Option("use_ema", "bool", "optimization", "Keep an exponential moving average of the weights.", default=False),
    Option("checkpoint_step_interval", "int", "checkpointing", "Save a checkpoint every N steps.",
           aliases=("checkpointing_steps",), minimum=1),
    Option("validation_step_interval", "int", "validation", "Render validation images every N steps.",
           aliases=("validation_steps",), minimum=1),
    Option("data_backend_config", "str", "data", "Path to the dataset list (multidatabackend.json).",
           required=True),
    Option("webhook_config", "json", "publishing", "Webhook targets: inline JSON or a path to a JSON file."),
    Option("report_to", "str", "logging", "Experiment trackers to report to (comma-separated).",
           choices=("tensorboard", "wandb", "comet_ml", "all", "none"), multiple=True, default="none"),
    Option("aspect_bucket_rounding", "int", "data", "Decimal places kept when rounding aspect ratios.",
           choices=tuple(range(1, 10))),
    Option("max_upscale_threshold", "float", "data", "Largest upscale factor accepted for small images."),
    Option("num_processes", "int", "environment", "Data-parallel processes (one per GPU).", default=1, minimum=1),
    Option("dynamo_backend", "str", "environment", "torch.compile backend, or no.", default="no"),
]
