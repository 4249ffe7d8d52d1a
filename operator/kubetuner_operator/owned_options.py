"""Trainer options the operator sets from the TrainingJob spec; users may not set them in spec.config."""

OWNED_OPTIONS: frozenset[str] = frozenset(
    {
        "model_family",
        "model_flavour",
        "model_type",
        "pretrained_model_name_or_path",
        "output_dir",
        "data_backend_config",
        "resume_from_checkpoint",
        "logging_dir",
        "num_processes",
        "metrics_port",
        "revision",
        "variant",
        "cache_dir",
        "cache_dir_vae",
        "cache_dir_text",
    }
)
