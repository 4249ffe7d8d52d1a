"""The training core: loop, LoRA, timestep sampling, losses, checkpoints and config-time checks.

``kubetuner_trainer.train.run(cfg)`` wires these to a model family and the data pipeline.
"""
